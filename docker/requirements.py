"""Print the project's dependencies (and one optional extra) from pyproject.toml, one per line,
so the image installs them in a layer that only changes when pyproject.toml does."""

import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
deps = list(project["dependencies"])
for extra in sys.argv[2:]:
    deps += project["optional-dependencies"][extra]
print("\n".join(deps))
