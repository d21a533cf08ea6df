"""Generated from protos/ by `make protos` (serving/protogen.py); do not edit."""
