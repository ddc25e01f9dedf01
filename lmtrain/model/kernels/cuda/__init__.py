"""Our CUDA kernels, written in Triton: the LSTM's pointwise steps (lstm_triton) and a window in one
persistent launch each way (lstm_persistent). Imported only where a GPU runs them (or Triton's CPU
interpreter in the tests)."""
