"""The environment running the tests is exactly the one requirements.lock pins."""

from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement

from tests.helpers import REPO


def test_every_locked_package_is_installed_at_its_pinned_version():
    mismatches = []
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue  # for another platform or Python
        [pin] = requirement.specifier
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            installed = None
        if pin.operator != "==" or installed != pin.version:
            mismatches.append(f"{requirement.name}: locked {pin}, installed {installed}")
    assert not mismatches, "\n".join(mismatches)
