"""Development tools run from the repository root (CI, the compatibility matrix); not part of the package."""
