"""INT8 W8A8 quantization with SmoothQuant."""
