"""NanoEvents forms built once per file in a slot subprocess, not once per chunk.

For every chunk, coffea's ``NanoEventsFactory.from_root`` walks the tree's branches to
build the base form (``UprootSourceMapping._extract_base_form``) and runs the schema over
it (``NanoAODSchema`` zips the collections, resolves the cross-references): 6-10 ms per
chunk on the AGC analysis, the same result every time for one tree. A slot subprocess
runs many chunks of the same few files, so :func:`install` (called with the file cache,
see :mod:`coffea_hq.filecache`) keeps both here:

- the base form, keyed by the ROOT file's UUID and path, the tree's path and number of
  entries and the branch options: a file's UUID is new whenever it is written, and a copy
  (same UUID) whose tree was written again in place (same tree path) has another path;
- for the schemas whose form depends on nothing but the base form (``BaseSchema`` and
  ``NanoAODSchema``), the schema's form, into which each chunk's own metadata (dataset,
  file, entry range) is put exactly where the schema puts it. Any other schema is run
  again per chunk, on a copy of the kept base form.

Only the executor's own factory shares a kept base form; events a processor builds itself
with coffea's ``NanoEventsFactory`` get a copy of it (coffea's factory writes the caller's
metadata into the form it is given). The chunk's mapping, entry range and columns are
built per chunk as before, so the events and every output are those coffea builds without
the cache. Only the slot subprocess is touched (it serves one job and ends), never the
analysis session.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Any

__all__ = ["FORMS_KEPT", "install"]

FORMS_KEPT = 64  # trees per slot subprocess; a NanoAOD form is some hundreds of kB at most

_INSTALLED = False
_sharing = threading.local()  # .on: inside the executor's own from_root


class _Lru(OrderedDict[Any, Any]):
    def keep(self, key: Any, value: Any) -> None:
        self[key] = value
        while len(self) > FORMS_KEPT:
            self.popitem(last=False)

    def hit(self, key: Any) -> Any:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value


class _Template:
    """A schema built once for a base form, and what the schema added to the metadata."""

    __slots__ = ("base_form", "schema", "added")

    def __init__(self, base_form: dict[str, Any], schema: Any, added: dict[str, Any]) -> None:
        self.base_form = base_form
        self.schema = schema
        self.added = added


def install() -> None:
    """Route this process's NanoEvents form building through the caches (once)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from coffea.nanoevents import BaseSchema, NanoAODSchema, NanoEventsFactory
    from coffea.nanoevents.mapping.uproot import UprootSourceMapping
    from coffea.nanoevents.util import tuple_to_key
    from coffea.processor import executor as coffea_executor

    # Schemas whose form is a function of the base form alone, the metadata put in as is
    # (NanoAODSchema adds its "version"): their output form is kept too.
    schemas = (BaseSchema, NanoAODSchema)
    base_forms = _Lru()
    templates = _Lru()
    extract = UprootSourceMapping._extract_base_form.__func__

    def kept_base_form(cls: Any, tree: Any, iteritems_options: Any = {}) -> Any:  # noqa: B006
        try:
            # A file's copy keeps its UUID, and a tree written again in place its path:
            # the file's own path and the tree's size tell those apart.
            key = (
                str(tree.file.uuid),
                tree.file.file_path,
                tree.object_path,
                tree.num_entries,
                repr(sorted(iteritems_options.items())),
            )
        except Exception:  # not a plain uproot TTree: nothing stable to key on
            return extract(cls, tree, iteritems_options)
        form = base_forms.hit(key)
        if form is None:
            form = extract(cls, tree, iteritems_options)
            base_forms.keep(key, form)
        # Only the executor's factory below leaves the kept form as it is; anyone else
        # (a processor building its own events with coffea's factory) gets a copy to
        # change: coffea's _from_mapping writes the caller's metadata into it.
        return form if getattr(_sharing, "on", False) else copy.deepcopy(form)

    class FormCachingFactory(NanoEventsFactory):
        """coffea's factory, with the schema's form kept per base form."""

        @classmethod
        def from_root(cls, *args: Any, **kwargs: Any) -> Any:
            _sharing.on = True
            try:
                return super().from_root(*args, **kwargs)
            finally:
                _sharing.on = False

        @classmethod
        def _from_mapping(
            cls,
            mapping: Any,
            partition_key: Any,
            base_form: dict[str, Any],
            schemaclass: Any,
            metadata: Any,
            mode: Any,
        ) -> Any:
            # The kept base form is shared by the chunks: the schema gets a copy to change.
            if schemaclass not in schemas:
                return super()._from_mapping(
                    mapping, partition_key, copy.deepcopy(base_form), schemaclass, metadata, mode
                )
            key = (id(base_form), schemaclass)
            template = templates.hit(key)
            if template is None or template.base_form is not base_form:
                # Built on empty metadata, what the schema puts in is exactly what it adds:
                # NanoAODSchema sets "version" even over a "version" the fileset gave.
                probe = copy.deepcopy(base_form)
                probe["parameters"]["metadata"] = {}
                schema = schemaclass(probe)
                added = dict(schema.form["parameters"]["metadata"])
                template = _Template(base_form, schema, added)
                templates.keep(key, template)
            schema = copy.copy(template.schema)
            form = dict(template.schema.form)
            parameters = dict(form["parameters"])
            # As the schema does: the chunk's own metadata dict, with the schema's additions.
            if metadata is None:
                metadata = {}
            metadata.update(template.added)
            parameters["metadata"] = metadata
            form["parameters"] = parameters
            schema._form = form
            return cls(schema, mapping, tuple_to_key(partition_key), mode=mode)

    UprootSourceMapping._extract_base_form = classmethod(kept_base_form)
    coffea_executor.NanoEventsFactory = FormCachingFactory
    _INSTALLED = True
