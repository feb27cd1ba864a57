"""Build the optional Cython speedups; install pure Python when they cannot be built.

The compiled twins live in ``_speedups/*.pyx`` and are built into the
``rpcresults`` package. A missing Cython, a missing compiler or a failing
compile never fails the install: the pure-Python twins are used instead.
``RPCRESULTS_NO_EXTENSIONS=1`` at build time skips compiling altogether.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class OptionalBuildExt(build_ext):
    """build_ext that warns and carries on when an extension cannot be built."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers: pure Python it is
            self._skip('the C extensions', exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(ext.name, exc)

    @staticmethod
    def _skip(what, exc):
        sys.stderr.write(f'WARNING: could not build {what} ({exc}); using the pure-Python implementation\n')


def extensions():
    if os.environ.get('RPCRESULTS_NO_EXTENSIONS'):
        return []
    sources = sorted(glob.glob(os.path.join('_speedups', '*.pyx')))
    if not sources:
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.stderr.write('WARNING: Cython is not installed; installing the pure-Python implementation\n')
        return []
    from setuptools import Extension
    modules = [
        Extension(f'rpcresults.{os.path.splitext(os.path.basename(path))[0]}', [path],
                  extra_compile_args=['-O2'])
        for path in sources
    ]
    try:
        return cythonize(modules, language_level=3, quiet=True,
                         compiler_directives={'boundscheck': False, 'wraparound': False,
                                              'cdivision': True})
    except Exception as exc:
        sys.stderr.write(f'WARNING: cythonize failed ({exc}); installing the pure-Python implementation\n')
        return []


setup(ext_modules=extensions(), cmdclass={'build_ext': OptionalBuildExt})
