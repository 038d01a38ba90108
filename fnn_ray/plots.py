"""Figures of the in-silico analyses: tuning, receptive fields and model performance (PNG files).

Uses matplotlib's object-oriented API with the Agg renderer only (``matplotlib.figure.Figure``, no pyplot):
no display, no global state, safe in workers. Every function takes a pandas table with one row per unit (the
columns it needs are listed in its docstring), writes its PNGs into ``out_dir`` (created if missing) and
returns their paths. Angles are in degrees (0 = rightward motion, counter-clockwise), screen positions in
normalised screen coordinates (``(-1, -1)`` bottom-left, ``(1, 1)`` top-right), as in ``IN_SILICO.md``.
Responses are the model's predicted rates (arbitrary units). Every figure says what it shows: how many units of
each scan it counts and why others are left out, the ``caption`` it is given (the stimulus and its parameters),
colourbar labels with units, and the fit's quality where a fit is drawn.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fnn_ray.analysis.receptive_fields import RF_THRESHOLD, rf_map
from fnn_ray.analysis.tuning import von_mises

__all__ = ["tuning_plots", "rf_plots", "performance_plots"]

#: gOSI above which a unit counts as orientation tuned (a common threshold, ``IN_SILICO.md`` §3).
TUNED_GOSI = 0.25
_DPI = 110


def _require(table: pd.DataFrame, columns: Sequence[str], caller: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{caller}: table lacks columns {missing}")


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI)
    return path


def _title(fig: Figure, headline: str, caption: str, fontsize: float = 9) -> None:
    """``headline`` and ``caption`` (the stimulus and its parameters), wrapped, as the figure's title."""
    width = int(fig.get_figwidth() * 130 / fontsize)  # characters that fit the figure's width
    fig.suptitle("\n".join([*textwrap.wrap(headline, width), *textwrap.wrap(caption, width)]), fontsize=fontsize)


def _scans(table: pd.DataFrame):
    """``(label, rows)`` per scan, in (session, scan_idx) order."""
    for (session, scan_idx), rows in table.groupby(["session", "scan_idx"], sort=True):
        yield f"{session}-{scan_idx}", rows


def tuning_plots(
    table: pd.DataFrame, directions_deg: Sequence[float], out_dir: str | Path, caption: str = "", n_curves: int = 12
) -> list[Path]:
    """Tuning figures: per scan, histograms of gOSI, gDSI, OSI/DSI (units whose fit is ok) and preferred
    orientation (``tuning_<session>-<scan_idx>.png``); and polar tuning curves of the ``n_curves`` units with
    the highest gOSI, responses with the fitted bimodal von Mises curve (``tuning_curves.png``; a flagged fit is
    drawn dashed and named; the curve is drawn only within the axes, which the responses set).

    Args:
        table: one row per unit with ``session, scan_idx, unit_id, gOSI, gDSI, OSI, DSI, pref_ori`` (degrees),
            ``direction_responses`` (a sequence of D mean responses, one per direction) and ``fit_mu`` (degrees),
            ``fit_phi, fit_kappa, fit_scale, fit_bias, fit_status``
            (:func:`fnn_ray.analysis.tuning.tuning_table`).
        directions_deg: the D directions of ``direction_responses``, in degrees.
        out_dir: folder for the PNGs.
        caption: the stimulus and its parameters, printed under each title.
        n_curves: number of example units.
    """
    columns = ["session", "scan_idx", "unit_id", "gOSI", "gDSI", "OSI", "DSI", "pref_ori", "direction_responses"]
    _require(table, columns + [f"fit_{k}" for k in ("mu", "phi", "kappa", "scale", "bias", "status")],
             "tuning_plots")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, rows in _scans(table):
        fig = Figure(figsize=(15, 4.2), layout="constrained")
        axes = fig.subplots(1, 4)
        for ax, name in zip(axes[:2], ("gOSI", "gDSI")):
            ax.hist(rows[name].dropna(), bins=np.linspace(0, 1, 41), color="tab:blue")
            if name == "gOSI":
                ax.axvline(TUNED_GOSI, color="k", lw=0.8, ls="--", label=f"gOSI = {TUNED_GOSI}")
                ax.legend(fontsize=7)
            ax.set(xlabel=name, ylabel="units", xlim=(0, 1), title=f"{name}: {int(rows[name].notna().sum())} units")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ok = rows["fit_status"] == "ok"
        for name, colour in (("OSI", "tab:blue"), ("DSI", "tab:orange")):
            axes[2].hist(rows.loc[ok, name].dropna(), bins=np.linspace(0, 1, 41), histtype="step", color=colour,
                         label=name)
        axes[2].set(xlabel="OSI, DSI (from the fit)", ylabel="units", xlim=(0, 1),
                    title=f"fit ok: {int(ok.sum())} of {len(rows)} units")
        axes[2].legend(fontsize=7)
        axes[2].yaxis.set_major_locator(MaxNLocator(integer=True))
        tuned = rows["gOSI"] > TUNED_GOSI
        bins = np.linspace(0, 180, 37)
        axes[3].hist(rows["pref_ori"].dropna(), bins=bins, color="0.75", label="all units")
        axes[3].hist(rows.loc[tuned, "pref_ori"].dropna(), bins=bins, color="tab:blue",
                     label=f"gOSI > {TUNED_GOSI}")
        axes[3].set(xlabel="preferred orientation (deg, of the fit)", ylabel="units", xlim=(0, 180),
                    xticks=range(0, 181, 45))
        axes[3].yaxis.set_major_locator(MaxNLocator(integer=True))
        axes[3].legend(fontsize=7)
        counts = rows["fit_status"].value_counts()
        flagged = ", ".join(f"{counts[s]} {s}" for s in ("kappa_bound", "failed", "nonfinite") if s in counts)
        _title(fig, f"scan {label}: {len(rows)} units in the scan, {int(ok.sum())} with an ok von Mises fit"
                    f"{f' (flagged, OSI/DSI NaN: {flagged})' if flagged else ''}, {int(tuned.sum())} with gOSI > "
                    f"{TUNED_GOSI}", caption)
        paths.append(_save(fig, out / f"tuning_{label}.png"))

    examples = table.dropna(subset=["gOSI"]).nlargest(n_curves, "gOSI")
    if len(examples):
        directions = np.asarray(directions_deg, dtype=float)
        dense = np.linspace(0, 360, 361)
        cols = min(4, len(examples))
        n_rows = -(-len(examples) // cols)
        fig = Figure(figsize=(3.4 * cols, 3.5 * n_rows + 1.2), layout="constrained")
        axes = np.atleast_1d(fig.subplots(n_rows, cols, subplot_kw={"projection": "polar"})).ravel()
        for ax, (_, row) in zip(axes, examples.iterrows()):
            responses = np.asarray(row["direction_responses"], dtype=float)
            top = 1.15 * np.nanmax(responses)
            ax.plot(np.deg2rad(directions), responses, "o", color="k", ms=3)
            with np.errstate(over="ignore", invalid="ignore"):
                fitted = von_mises(dense, row["fit_mu"], row["fit_phi"], row["fit_kappa"], row["fit_scale"],
                                   row["fit_bias"])
            ok = row["fit_status"] == "ok"
            ax.plot(np.deg2rad(dense), np.where(fitted <= top, fitted, np.nan), color="tab:red" if ok else "0.5",
                    lw=1.2, ls="-" if ok else "--")
            ax.set_rlim(0, top)  # the data set the scale; the fit is drawn only where the axes hold it
            ax.yaxis.set_major_locator(MaxNLocator(3))
            ax.set_xticks(np.deg2rad([0, 90, 180, 270]))
            ax.tick_params(labelsize=7)
            quality = (f"OSI {row['OSI']:.2f} DSI {row['DSI']:.2f}" if ok
                       else f"fit flagged: {row['fit_status']}")
            ax.set_title(f"{row['session']}-{row['scan_idx']} unit {row['unit_id']}\n"
                         f"gOSI {row['gOSI']:.2f} gDSI {row['gDSI']:.2f}; {quality}", fontsize=8)
        for ax in axes[len(examples):]:
            ax.set_visible(False)
        _title(fig, f"the {len(examples)} most orientation-selective of {len(table)} units (gOSI): mean response "
                    "(dots, a.u.) per direction of motion and fitted bimodal von Mises (red; dashed grey: a flagged "
                    "fit)\nangle = direction of motion (0 deg = rightward, counter-clockwise), radius = response",
               caption, fontsize=8)
        paths.append(_save(fig, out / "tuning_curves.png"))
    return paths


def rf_plots(
    table: pd.DataFrame,
    height: int,
    width: int,
    out_dir: str | Path,
    n_examples: int = 6,
    threshold: float = RF_THRESHOLD,
    caption: str = "",
) -> list[Path]:
    """Receptive-field figures: ON, OFF and ON+OFF STA maps and the baseline-removed map used for the centre of
    the ``n_examples`` units with the highest published SSI (``rf_examples.png``), and per scan the RF centres
    on the screen coloured by the published SSI (``rf_centres_<session>-<scan_idx>.png``).

    Args:
        table: one row per unit with ``session, scan_idx, unit_id, sta_on, sta_off, sta_on_off`` (``[R, C]``
            arrays or nested lists, row 0 at the top of the screen), ``ssi, rf_x, rf_y, ssi_rf_map``
            (:func:`fnn_ray.analysis.receptive_fields.rf_table`).
        height: screen height in pixels (the dot grid covers the screen).
        width: screen width in pixels.
        out_dir: folder for the PNGs.
        n_examples: number of example units.
        threshold: the cut of the map drawn, as given to ``rf_table``
            (:func:`~fnn_ray.analysis.receptive_fields.rf_map`).
        caption: the stimulus and its parameters, printed under each title.
    """
    _require(table, ["session", "scan_idx", "unit_id", "sta_on", "sta_off", "sta_on_off", "ssi", "rf_x", "rf_y",
                     "ssi_rf_map"], "rf_plots")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    screen = {"xlim": (-1, 1), "ylim": (-1, 1), "xticks": [-1, 0, 1], "yticks": [-1, 0, 1]}
    paths = []
    examples = table.dropna(subset=["ssi"]).nlargest(n_examples, "ssi")
    if len(examples):
        fig = Figure(figsize=(3.4 * len(examples), 9.0), layout="constrained")
        axes = np.asarray(fig.subplots(4, len(examples), squeeze=False))
        for j, (_, row) in enumerate(examples.iterrows()):
            on, off = np.asarray(row["sta_on"], dtype=float), np.asarray(row["sta_off"], dtype=float)
            panels = (("ON STA", on, "mean response (a.u.)"), ("OFF STA", off, "mean response (a.u.)"),
                      ("ON+OFF STA", np.asarray(row["sta_on_off"], dtype=float), "mean response (a.u.)"),
                      ("RF map", rf_map(on[None], off[None], threshold)[0], "above baseline (a.u.)"))
            for i, (name, image, unit) in enumerate(panels):
                ax = axes[i, j]
                shown = ax.imshow(image, extent=(-1, 1, -1, 1), origin="upper", cmap="viridis",
                                  interpolation="nearest")
                ax.plot(row["rf_x"], row["rf_y"], "+", color="tab:red", ms=10, mew=1.5)
                ax.set(aspect=height / width, **screen)
                ax.tick_params(labelsize=7)
                ax.set_title(f"{row['session']}-{row['scan_idx']} unit {row['unit_id']}: {name}"
                             + (f"\nSSI {row['ssi']:.2f}, SSI of the map {row['ssi_rf_map']:.2f}" if i == 0 else ""),
                             fontsize=8)
                bar = fig.colorbar(shown, ax=ax, shrink=0.7)
                bar.set_label(unit, fontsize=7)
                bar.ax.tick_params(labelsize=7)
        axes[-1, 0].set(xlabel="x (screen, right)", ylabel="y (screen, up)")
        _title(fig, f"the {len(examples)} receptive fields of highest SSI (published: raw ON+OFF STA) of "
                    f"{len(table)} units; + = RF centre (baseline-removed map, cells below {threshold:g} x peak "
                    "dropped); normalised screen coordinates, (1, 1) = top right", caption, fontsize=8)
        paths.append(_save(fig, out / "rf_examples.png"))
    for label, rows in _scans(table):
        fig = Figure(figsize=(7.5, 7.5 * height / width + 1.6), layout="constrained")
        ax = fig.subplots()
        dots = ax.scatter(rows["rf_x"], rows["rf_y"], c=rows["ssi"], s=6, cmap="viridis")
        ax.set(aspect=height / width, xlabel="x (normalised screen, right)", ylabel="y (normalised screen, up)",
               **screen)
        fig.colorbar(dots, ax=ax, shrink=0.6, label="SSI (published, -log det Cov, no unit)")
        _title(fig, f"scan {label}: RF centres of {int(rows['rf_x'].notna().sum())} of {len(rows)} units in the "
                    "scan (the others have no response above baseline)", caption, fontsize=8)
        paths.append(_save(fig, out / f"rf_centres_{label}.png"))
    return paths


def performance_plots(table: pd.DataFrame, out_dir: str | Path, max_points: int = 20000,
                      caption: str = "") -> list[Path]:
    """Model-performance figure (``performance.png``): CC_max histogram per scan, CC_abs against CC_max (at most
    ``max_points`` units drawn, chosen at random with a fixed seed) and the median CC_norm per scan; every panel
    counts the units scored (finite cc_abs, cc_max and cc_norm) against the units in the scan.

    Args:
        table: one row per unit with ``session, scan_idx, cc_abs, cc_max, cc_norm`` (and optionally ``frames``,
            the frames scored per unit).
        out_dir: folder for the PNG.
        max_points: scatter points drawn at most.
        caption: what was evaluated (recordings, burn-in), printed under the title.
    """
    _require(table, ["session", "scan_idx", "cc_abs", "cc_max", "cc_norm"], "performance_plots")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = table.assign(scored=np.isfinite(table[["cc_abs", "cc_max", "cc_norm"]].to_numpy(float)).all(axis=1))
    scans = list(_scans(table))
    palette = colormaps["tab10" if len(scans) <= 10 else "tab20"]
    colours = [palette(i % palette.N) for i in range(len(scans))]
    fig = Figure(figsize=(15, 5.0), layout="constrained")
    hist_ax, scatter_ax, bar_ax = fig.subplots(1, 3)
    bins = np.linspace(0, 1, 41)
    scored = table[table["scored"]]
    shown = scored.sample(n=min(max_points, len(scored)), random_state=0)
    medians = []
    for (label, rows), colour in zip(scans, colours):
        ok = rows[rows["scored"]]
        medians.append(float(np.median(ok["cc_norm"])) if len(ok) else np.nan)
        hist_ax.hist(ok["cc_max"], bins=bins, histtype="step", color=colour,
                     label=f"{label}: {len(ok)} of {len(rows)}")
        picked = shown[(shown["session"] == rows["session"].iloc[0]) & (shown["scan_idx"] == rows["scan_idx"].iloc[0])]
        scatter_ax.scatter(picked["cc_max"], picked["cc_abs"], s=2, color=colour, alpha=0.4, rasterized=True,
                           label=f"{label}: median CC_norm {medians[-1]:.2f}")
    hist_ax.set(xlabel="CC_max", ylabel="units", xlim=(0, 1), title="CC_max (upper bound from repeats)")
    hist_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    hist_ax.legend(fontsize=7, ncol=2, title="scan: units scored of units in the scan", title_fontsize=7)
    scatter_ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--", label="CC_abs = CC_max")
    scatter_ax.set(xlabel="CC_max", ylabel="CC_abs", xlim=(0, 1), ylim=(-0.2, 1), aspect="equal",
                   title=f"CC_abs vs CC_max ({len(shown)} of {len(scored)} scored units drawn)")
    scatter_ax.legend(fontsize=7, loc="upper left", markerscale=4)
    labels = [label for label, _ in scans]
    bar_ax.bar(range(len(scans)), medians, color=colours)
    for i, value in enumerate(medians):
        if np.isfinite(value):
            bar_ax.text(i, value, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
    bar_ax.set(xticks=range(len(scans)), ylabel="median CC_norm (scored units)", title="median CC_norm per scan",
               ylim=(0, max(1.0, np.nanmax(medians + [0.0]) * 1.1)))
    bar_ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    bar_ax.set_xlabel("scan (session-scan_idx)")
    frames = ""
    if "frames" in table.columns and table["frames"].notna().any():
        frames = (f"; frames scored per unit: median {int(table['frames'].median())}, least "
                  f"{int(table['frames'].min())}")
    _title(fig, f"model performance: {int(table['scored'].sum())} of {len(table)} units scored in {len(scans)} "
                f"scan(s) (not scored: never recorded or no variance){frames}", caption)
    return [_save(fig, out / "performance.png")]
