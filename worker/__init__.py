"""hq-worker: pulls tasks from the queue server and runs them in subprocesses."""
