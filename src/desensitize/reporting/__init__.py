"""What people read: each stage's record and headline figures, PNG figures, the model and data cards,
and the run summary."""
