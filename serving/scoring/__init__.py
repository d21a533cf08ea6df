"""Batch scoring of CSV and Parquet files: chunked readers, row validation, writers, back-ends, the pipeline.

`serving.score` is the command line; this package does the work:
- `readers`: the input, streamed in chunks, each row numbered as in the input (1 = first data row);
- `validate`: feature columns -> float32 matrix, and the rows that cannot be scored, with reasons;
- `backends`: ONNX Runtime in-process, or a server over the Open Inference Protocol;
- `writers`: the output and the errors file, written under temporary names and renamed at the end;
- `pipeline`: read -> validate -> score (N in flight) -> write in input order, with bounded memory.
- `interrupts`: SIGINT and SIGTERM stop a run cleanly; the steps that must not be cut in two wait for them.
"""
