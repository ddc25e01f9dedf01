"""lmtrain: train, evaluate and sample next-word LSTM language models from the command line."""

__version__ = "0.1.0"
