"""The package list, which pyproject.toml cannot express (everything else is in pyproject.toml).

Every folder under compress/, criteria/ and exporters/ is a package (as ``packages.find`` would do, namespace
folders included, so what imports from the checkout imports from a wheel), plus ``compress.recipes``: the
top-level recipes/ folder, mapped in pyproject.toml's ``[tool.setuptools.package-dir]`` and shipped as package
data so an installed wheel has the recipe TOML files. pyproject's ``packages.find`` cannot add that mapped package.
"""

from setuptools import find_namespace_packages, setup

PACKAGES = find_namespace_packages(include=["compress", "compress.*", "criteria", "criteria.*", "exporters",
                                            "exporters.*"], exclude=["*.__pycache__"])

setup(packages=[*PACKAGES, "compress.recipes"])
