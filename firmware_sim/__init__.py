"""Simulated device fleet for exercising RapidMQ Edge (arrives with a later issue)."""
