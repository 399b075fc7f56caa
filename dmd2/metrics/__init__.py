"""Image-quality metrics: Frechet distance, the MNIST feature classifier, and the MNIST evaluator."""
