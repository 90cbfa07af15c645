"""fedistill ServerApp: validate uploads, merge, train and evaluate the global model (``server.app:app``)."""
