"""Build the compiled twins; install pure Python when they cannot be built.

Each hot-path module under ``rpcresults/protocol/`` is one source, ``_<name>_py.py``,
that runs as pure Python and that Cython compiles, with the C types of
``_<name>_c.pxd`` beside it, into the extension ``rpcresults.protocol._<name>_c``.
A missing Cython, a missing compiler or a failing compile never fails the install:
the pure-Python twins are used instead (``rpcresults.USING_EXTENSION`` is then
False). ``RPCRESULTS_NO_EXTENSIONS=1`` at build time skips compiling altogether.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

PROTOCOL = os.path.join('rpcresults', 'protocol')


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


def twins():
    """``(extension name, pure source)`` for every twin that has a ``.pxd``."""
    for pxd in sorted(glob.glob(os.path.join(PROTOCOL, '_*_c.pxd'))):
        stem = os.path.basename(pxd)[:-len('_c.pxd')]
        source = os.path.join(PROTOCOL, f'{stem}_py.py')
        if os.path.exists(source):
            yield f'rpcresults.protocol.{stem}_c', source


def extensions():
    if os.environ.get('RPCRESULTS_NO_EXTENSIONS'):
        return []
    pairs = list(twins())
    if not pairs:
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.stderr.write('WARNING: Cython is not installed; installing the pure-Python implementation\n')
        return []
    from setuptools import Extension
    modules = [Extension(name, [source], extra_compile_args=['-O2']) for name, source in pairs]
    try:
        return cythonize(modules, language_level=3, quiet=True,
                         compiler_directives={'boundscheck': False, 'wraparound': False, 'cdivision': True,
                                              # the .py files carry type hints for readers and mypy;
                                              # the C types are the .pxd's alone
                                              'annotation_typing': False})
    except Exception as exc:
        sys.stderr.write(f'WARNING: cythonize failed ({exc}); installing the pure-Python implementation\n')
        return []


setup(ext_modules=extensions(), cmdclass={'build_ext': OptionalBuildExt})
