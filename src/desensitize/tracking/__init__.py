"""MLflow and DVC bookkeeping: the runs a pipeline execution records, the model registry, the
auditor's lineage, and code and data versions."""
