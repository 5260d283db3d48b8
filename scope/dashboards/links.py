"""Links from feature ids to the pages of a published dashboard site, for analyses that name features.

A link is the page :func:`scope.dashboards.site.feature_page` names, as a ``file://`` URL for a
local site (it opens from a notebook, a terminal or another HTML file) or the site's own URL
otherwise; features the site does not hold get no link.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from scope.dashboards.publish import fingerprint
from scope.dashboards.site import SITE_FORMAT, SITE_META, feature_page, read_index
from scope.dictionaries.base import Dictionary
from scope.errors import ScopeError
from scope.store.fs import StoreFS


@dataclass
class SiteLinks:
    """feature id -> URL of its page in one published site (None for a feature the site lacks)."""

    site: str
    features: frozenset[int]
    meta: dict

    def url(self, feature: int) -> str | None:
        """The page of ``feature``, or None where the site does not hold it."""
        if int(feature) not in self.features:
            return None
        fs = StoreFS(self.site)
        page = feature_page(feature)
        return Path(fs.path(page)).resolve().as_uri() if fs.is_local else fs.url(page)

    __call__ = url


def site_links(site: str, sae: Dictionary | None = None) -> SiteLinks:
    """Links into a site written by ``scope dashboard publish``; with ``sae``, the site must be of that dictionary."""
    fs = StoreFS(site)
    if not fs.exists(SITE_META):
        raise ScopeError(f"{site!r} is not a dashboard site (no {SITE_META}); publish one with "
                         "`scope dashboard publish`")
    meta = json.loads(fs.read_bytes(SITE_META))
    if meta.get("format") != SITE_FORMAT:
        raise ScopeError(f"{site!r} holds a {SITE_META} of format {meta.get('format')!r}, not a scope dashboard site")
    if sae is not None:
        published = meta.get("sae", {})
        if published.get("fingerprint") != fingerprint(sae):
            raise ScopeError(f"the site {site!r} was published from another dictionary ({published.get('kind')}, d_sae "
                             f"{published.get('d_sae')}, from {meta.get('sae_source')!r}) than this {sae.cfg.kind} "
                             f"with d_sae {sae.cfg.d_sae}; its pages would describe other features")
    return SiteLinks(site=site, features=frozenset(read_index(site)), meta=meta)
