"""Using and judging a model: KV-cache generation (`generate`), chat / predict / teacher-forced
eval (`inference`), ROUGE / BLEU / perplexity (`metrics`), and the run report with its curve
diagnosis (`report`, `diagnosis`). Imports models, data, losses and io; never the trainer.
"""
