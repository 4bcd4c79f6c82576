"""Optical constants of the droplet materials from the Henke tables.

The refractive index of a material in the soft/hard X-ray range is
``n = 1 - delta + i beta`` with (Henke, Gullikson & Davis, At. Data Nucl. Data
Tables 54, 181 (1993))

    delta = r_e lambda^2 / (2 pi) * n_a * f1,     beta = r_e lambda^2 / (2 pi) * n_a * f2,

where ``r_e`` is the classical electron radius, ``n_a`` the number density of atoms
and ``f1``, ``f2`` the tabulated atomic scattering factors. The tables shipped in
``data/*.nff`` are the Henke/CXRO tables (as distributed with the ``periodictable``
package), cut to 29-5000 eV. The sign convention ``+ i beta`` goes with waves
``exp(+i k z)``: a wave crossing a thickness ``t`` is multiplied by
``exp(i k (n - 1) t)`` and so attenuated by ``exp(-k beta t)``.
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np

from pipeline.errors import AirysortError

#: Classical electron radius (m).
ELECTRON_RADIUS = 2.8179403262e-15
#: Avogadro constant (1/mol).
AVOGADRO = 6.02214076e23
#: h c in J m, to convert wavelength (m) to photon energy (J).
HC = 1.98644586e-25
#: Joules per electronvolt.
EV = 1.602176634e-19

#: Materials known to the simulator: table file, molar mass (g/mol), mass density (kg/m^3).
#: Liquid helium at 0.4 K; xenon clusters grown inside droplets are solid (3.64 g/cm^3).
MATERIALS: dict[str, tuple[str, float, float]] = {
    "helium": ("he.nff", 4.002602, 145.0),
    "xenon": ("xe.nff", 131.293, 3640.0),
}


@functools.cache
def _table(material: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if material not in MATERIALS:
        raise AirysortError(
            f"unknown material {material!r}; known materials: {', '.join(sorted(MATERIALS))}"
        )
    text = resources.files("pipeline.simulate").joinpath("data", MATERIALS[material][0]).read_text()
    rows = np.loadtxt(text.splitlines()[1:])
    return rows[:, 0], rows[:, 1], rows[:, 2]


def photon_energy_ev(wavelength: float) -> float:
    """Photon energy (eV) of light of the given wavelength (m)."""
    return HC / wavelength / EV


def refractive_index(material: str, wavelength: float) -> complex:
    """Complex refractive index ``n = 1 - delta + i beta`` of a material.

    Parameters
    ----------
    material : str
        A key of :data:`MATERIALS` (``"helium"``, ``"xenon"``).
    wavelength : float
        Vacuum wavelength (m); the tables cover 29-5000 eV (43-0.25 nm).

    Returns
    -------
    complex
        ``1 - delta + 1j * beta``; f1 and f2 are interpolated log-linearly in energy.

    Examples
    --------
    >>> n = refractive_index("helium", 13.5e-9)   # 91.8 eV, FERMI
    >>> round(1 - n.real, 4), round(n.imag, 4)
    (0.0039, 0.0012)
    """
    energy, f1, f2 = _table(material)
    e = photon_energy_ev(wavelength)
    if not energy[0] <= e <= energy[-1]:
        raise AirysortError(
            f"wavelength {wavelength!r} m ({e:.1f} eV) is outside the optical-constant "
            f"tables ({energy[0]:.0f}-{energy[-1]:.0f} eV); choose a wavelength between "
            f"{HC / (energy[-1] * EV):.3g} and {HC / (energy[0] * EV):.3g} m"
        )
    log_e = np.log(energy)
    f1_e = np.interp(np.log(e), log_e, f1)
    # f2 spans decades and is positive: interpolate its logarithm.
    f2_e = np.exp(np.interp(np.log(e), log_e, np.log(np.maximum(f2, 1e-30))))
    _, molar_mass, density = MATERIALS[material]
    atoms_per_m3 = density * 1e3 / molar_mass * AVOGADRO
    prefactor = ELECTRON_RADIUS * wavelength**2 / (2 * np.pi) * atoms_per_m3
    return complex(1 - prefactor * f1_e, prefactor * f2_e)
