"""lmjax training: data pipelines, the trainer, objectives and the command-line jobs."""
