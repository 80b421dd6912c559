"""Above the stages: the stage table and the runner that the CLI, DVC and Prefect all go through, and the
privacy-utility sweep (its plan, its runs, its frontier)."""
