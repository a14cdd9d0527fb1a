"""Consumers that train and measure: fine-tuning with distillation, data folders, keep-rate schedules, evaluation."""
