"""xorserve load testing: a Locust gRPC user for the Open Inference Protocol and a headless runner."""
