"""When an image is done: the watcher's exactly-once rule, and the function that decides it.

Exactly once, by construction. :func:`complete_results` is the one place that decides "done";
the rest of the watcher (:mod:`cxrsr.pacs.watch`, :mod:`cxrsr.pacs.watch_work`,
:mod:`cxrsr.pacs.watch_state`, :mod:`cxrsr.pacs.claims`) follows from this rule:

* **Done means a complete result in Orthanc, asked before work.** An image has a result
  from these weights when the SR series that the SR builder derives for its series, the
  model and the weights (:func:`cxrsr.sr.uids.sr_series_uid`) holds an SR whose evidence
  names the image's SOP Instance UID *and* every other object that SR names (its
  Pertinent Other Evidence: the key image) is in Orthanc too. An SR alone is not a
  result. Orthanc is asked before the watcher's own log (one list per series; each SR's
  evidence is read once), so a result deleted from Orthanc, or a study deleted and sent
  again, is stored again, and a lost state folder costs nothing.
* **Stored means stored and verified, key images first.** An image's objects go in two
  phases: its key image is sent and verified (MD5 and placement, as ``upload_dicom.py``
  checks); only when every other object of the image verified is its SR sent and
  verified. An image with any object not stored is a failure (``--once`` exits 1 and
  names it on an ``E:`` line), tried again at the next pass, and after
  ``max_attempts`` attempts a dead letter.
* **One watcher per image: a claim in Orthanc.** Before downloading an image a watcher
  claims it (:mod:`cxrsr.pacs.claims`: the instance's ``cxrsr-claim`` metadata, created
  only if absent, atomically). A second watcher, on this host or another, finds the
  claim and leaves the image to its holder while the holder's lease lives; the holder
  renews the lease while it works and stops working on an image (sends nothing for it)
  once a renewal fails.
* **Lease expiry hands the work over, byte-identically.** The claim holds the
  result's ``classified_at``, fixed before anything is sent. When a holder dies its
  lease expires and another watcher takes the claim over (compare and swap on the
  claim's ETag) and reuses that ``classified_at``, so the objects it rebuilds are
  byte-identical (their UIDs are derived from their content) and Orthanc answers
  ``AlreadyStored`` to any the dead holder had sent, instead of storing a second
  result. A watcher's own repeat (after ``kill -9``, or a result partly deleted from
  Orthanc) reuses its audit log's ``classified_at`` the same way. After storing, the
  claim is marked ``done``; "done" is still decided by the complete set in Orthanc.
  An Orthanc without claims is reported on one ``W:`` line and the watcher works alone.
* **The cursor only moves past finished work.** Changes are acted on a page at a time and
  the cursor is saved (atomically) after the whole page is done; a crash repeats a page.
* **No loops.** Only series whose Modality is CR or DX are looked at, so the watcher's
  own SRs (Modality SR) and anything else (CT, MR, SC, ...) are never fetched; an object
  whose Manufacturer is this project's is refused as well, whatever its Modality.
* **A bad instance is a dead letter**, recorded once with its reason and not retried
  unless asked (``--retry-failed``).
* **Stops lose nothing finished.** SIGTERM sets :attr:`cxrsr.pacs.watch.Watcher.stop`, checked at safe
  points (between batches, requests and phases); Ctrl-C raises ``KeyboardInterrupt``,
  also during classification. Either way what was recorded stays recorded, what was in
  flight is given back (its claims released) and repeated.

Where each part lives: the SR series and the objects' UIDs derive from the content
(:mod:`cxrsr.sr.uids`), so a repeat rebuilds the same bytes; the two-phase store and the
claims are :class:`cxrsr.pacs.watch_work.ClaimedWork`; the audit log, ``classified_at``
and dead letters are :mod:`cxrsr.pacs.watch_state`; the cursor and the sweeps are
:class:`cxrsr.pacs.watch.Watcher`. The SRs of each chunk are built from a results document
made for it, exactly as ``generate_sr.py`` builds them from a results file, so the watcher
stores the very bytes the scripts would.
"""

from __future__ import annotations

from cxrsr.pacs.watch_index import Evidence, OrthancIndex
from cxrsr.sr.entries import ModelInfo
from cxrsr.sr.uids import sr_series_uid


class ResultsInOrthanc:
    """Which images of a series are done, asked of Orthanc (:func:`complete_results`).

    Remembers each SR's evidence (read once per SR: an SR's bytes never change); what is
    asked every time is one list per series.
    """

    def __init__(self, index: OrthancIndex, model: ModelInfo) -> None:
        self.index = index
        self.model = model
        self._evidence: dict[str, Evidence] = {}

    def __call__(self, series_uid: str) -> set[str]:
        return complete_results(self.index, self.model, series_uid, self._evidence)


def complete_results(
    index: OrthancIndex, model: ModelInfo, series_uid: str, known: dict[str, Evidence]
) -> set[str]:
    """SOP Instance UIDs of the series' images with a complete result from these weights.

    Complete: an SR in the series' SR series (:func:`cxrsr.sr.uids.sr_series_uid` of the
    series, the model and the weights) describes the image, and every other object that SR
    names (its key image) is in Orthanc too. ``known`` is the evidence of SRs read before,
    by Orthanc ID; the SRs read now are added to it.
    """
    ours = sr_series_uid(series_uid, model.model_id, model.weights_sha256)
    sr_series = index.lookup_series(ours)
    if sr_series is None:
        return set()
    evidences = []
    for instance in index.series_instances(sr_series, ours):
        evidence = known.get(instance.orthanc_id)
        if evidence is None:
            evidence = known[instance.orthanc_id] = index.evidence(instance.orthanc_id)
        evidences.append(evidence)
    in_orthanc: dict[str, set[str]] = {}
    for series in {series for e in evidences for series, _ in e.others}:
        in_orthanc[series] = index.series_sop_instance_uids(series)
    found: set[str] = set()
    for evidence in evidences:
        if all(uid in in_orthanc[series] for series, uid in evidence.others):
            found |= evidence.described
    return found
