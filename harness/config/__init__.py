"""Typed configuration: the schema (``schema.py``, ``template.py``), importing nothing from the
package. Start-up validation, which needs the package, is ``harness.validation``. Import the
schema's nodes from ``harness.config.schema`` inside the package; this module gathers them for
callers above it.
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

__all__ = ["AlignmentConfig", "AttackConfig", "ConfigError", "DataSourceConfig", "DefenseConfig",
           "EvalConfig", "FIELDS", "FilterConfig", "GenerationConfig", "JudgeConfig",
           "LLMJudgeConfig", "LoggerConfig", "LoraConfig", "ModelConfig", "ModerationConfig",
           "PathsConfig", "ProtocolConfig", "RunConfig", "ScorerConfig", "StageMethodConfig",
           "FAMILIES", "TaskConfig", "TaskProtocolConfig", "ToyWorldConfig", "TrainConfig",
           "TrainStageConfig", "TrainerConfig", "parse_slice", "register", "TemplateConfig"]
