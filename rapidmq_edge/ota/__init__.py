"""Over-the-air model updates (docs/ota.md): signed SUIT-shaped manifests, resumable
chunked downloads over the upstream cluster, A/B slots, shadow evaluation, staged rollouts."""
