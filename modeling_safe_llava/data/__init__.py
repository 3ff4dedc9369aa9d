"""Data the project makes or converts: the offline synthetic mini safety benchmark (`mini_benchmark`) and the
converters of public safety datasets to the paper's schema (`convert`: VLGuard, HoliSafe-Bench)."""
