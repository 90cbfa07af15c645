"""fedistill ClientApp: distill the local partition and upload the synthetic set (``client.app:app``)."""
