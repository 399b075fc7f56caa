"""Training side: the DMD2 distillation trainer and the embedded teacher trainer."""
