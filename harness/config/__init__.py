"""Typed configuration: the schema (``schema.py``, ``template.py``: importing nothing from the
package) and start-up validation (``validation.py``). Import the schema's nodes from
``harness.config.schema`` inside the package; this module gathers both for callers above them.
"""
from harness.config.schema import (AlignmentConfig, AttackConfig, ConfigError, DataSourceConfig,
                                  DefenseConfig, EvalConfig, FIELDS, FilterConfig,
                                  GenerationConfig, JudgeConfig, LLMJudgeConfig, LoggerConfig,
                                  LoraConfig, ModelConfig, ModerationConfig, PathsConfig,
                                  ProtocolConfig, RunConfig, ScorerConfig, StageMethodConfig,
                                  FAMILIES, TaskConfig, TaskProtocolConfig, ToyWorldConfig,
                                  TrainConfig, TrainStageConfig, TrainerConfig, parse_slice,
                                  register)
from harness.config.template import TemplateConfig
from harness.config.validation import accelerator_kind, training_processes, validate

__all__ = ["AlignmentConfig", "AttackConfig", "ConfigError", "DataSourceConfig", "DefenseConfig",
           "EvalConfig", "FIELDS", "FilterConfig", "GenerationConfig", "JudgeConfig",
           "LLMJudgeConfig", "LoggerConfig", "LoraConfig", "ModelConfig", "ModerationConfig",
           "PathsConfig", "ProtocolConfig", "RunConfig", "ScorerConfig", "StageMethodConfig",
           "FAMILIES", "TaskConfig", "TaskProtocolConfig", "ToyWorldConfig", "TrainConfig",
           "TrainStageConfig", "TrainerConfig", "parse_slice", "register", "TemplateConfig",
           "accelerator_kind", "training_processes", "validate"]
