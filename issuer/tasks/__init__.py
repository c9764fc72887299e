"""Per-task credentials: the task service, its policy and the approval queue."""
