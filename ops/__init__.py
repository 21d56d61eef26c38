"""What an SRE runs and reads: the `agentfleet` CLI, the embedded server, traces, the demo."""
