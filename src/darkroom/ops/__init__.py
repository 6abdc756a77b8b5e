"""Process plumbing every stage shares: stopping between steps, the cores a process may use."""
