"""Declarative search spaces shipped with the harness: one YAML file each; see README "Space files"."""
