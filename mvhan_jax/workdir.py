"""Workdir paths (placeholder, replaced by the epath module)."""
from etils import epath
import json

def path(p):
  return epath.Path(p)

def is_remote(p):
  return "://" in str(p)

def makedirs(p):
  path(p).mkdir(parents=True, exist_ok=True)

def write_text(p, text):
  path(p).write_text(text)

def write_json(p, obj):
  path(p).write_text(json.dumps(obj, indent=2))

def exists(p):
  return path(p).exists()
