"""The miniature ProMoT lab: a synthetic task suite and a tiny pretrained T5 (docs/lab.md)."""
