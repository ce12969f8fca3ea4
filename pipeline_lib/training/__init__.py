"""Training: one model at a time (``fit``) and K models at once (``ensemble``)."""
