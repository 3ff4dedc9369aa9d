"""Data the project makes or converts: the offline synthetic mini safety benchmark."""
