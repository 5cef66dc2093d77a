"""cnnlab: train, sweep, fine-tune and explain image classifiers on a folder of labelled images."""

__version__ = "0.1.0"
