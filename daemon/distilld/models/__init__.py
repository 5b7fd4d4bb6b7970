"""What training and serving must compute identically for a student model."""
