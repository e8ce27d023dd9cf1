"""TensorBoard logs: a fast event-file reader and writer, aggregation, outputs. No torch."""
