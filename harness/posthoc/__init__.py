"""Post-hoc stages: training-free edits of the finetuned adapter, between finetune and
evaluation (``posthoc=none|safelora|antidote``; conf/posthoc/). One module and one YAML each."""
