"""The message pipeline between ingress and the store: authorise, score, secure, forward."""
