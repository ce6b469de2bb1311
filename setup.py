"""Packaging for himbeerecouch (metadata lives here so stdeb and pybuild see it)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"',
                    Path(__file__).with_name("himbeerecouch").joinpath("__init__.py").read_text()).group(1)

setup(
    name="himbeerecouch",
    version=VERSION,
    description="Run Python programs stored in CouchDB on a fleet of Raspberry Pis",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["himbeerecouch", "himbeerecouch.*"]),
    # The fleet page's files (page.py stores them in the database); not Python, so named here.
    package_data={"himbeerecouch": ["fleetpage/*.html", "fleetpage/*.css", "fleetpage/*.js"]},
    install_requires=[
        "pycouchdb>=1.17,<1.18",
        # pycouchdb imports it without declaring it.
        "typing_extensions",
        "requests",
        "sdnotify>=0.3",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6"], "gpio": ["RPi.GPIO"]},
    entry_points={
        "console_scripts": [
            "himbeerecouch = himbeerecouch.cli:main",
            "himbeerecouch-creds = himbeerecouch.cli:creds_main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: System :: Distributed Computing",
    ],
)
