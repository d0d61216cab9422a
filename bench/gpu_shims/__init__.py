"""cosy's stand-ins for packages a GPU machine without network lacks: for the random-model timing only
(bench/gpu-check.sh). See README.md beside this file."""
