"""`python -m cicd_ray.cli`, as it worked before the command line became a package."""

from cicd_ray.cli import main

main()
