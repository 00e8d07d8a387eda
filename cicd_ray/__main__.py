"""`python -m cicd_ray`: the command line, as the `cicd-ray` console script runs it."""

from cicd_ray.cli import main

main()
