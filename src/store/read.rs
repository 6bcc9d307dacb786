//! Reading transfers: one, all of them (through the index when this handle holds it), and the
//! lookups by platform task and by tag.

use std::path::PathBuf;

use super::{Store, TaskMap, lock};
use crate::error::{Error, ErrorKind, Result};
use crate::layout::{STATE, TRANSFERS};
use crate::state_file;
use crate::transfer::{Kind, Outcome, Phase, State, Transfer, TransferId};

/// Everything under `transfers/`, as one listing.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Scan {
    /// Readable transfers, in id order.
    pub transfers: Vec<Transfer>,
    /// Transfers whose manifest failed its checks: quarantine them.
    pub corrupt: Vec<(TransferId, Error)>,
    /// Entries that are not canonical transfer directories.
    pub unknown: Vec<PathBuf>,
}

/// A filter for [`Store::list`]; every field set must match.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Filter {
    /// Only this phase.
    pub phase: Option<Phase>,
    /// Only this group.
    pub group: Option<String>,
    /// Only this session.
    pub session: Option<String>,
    /// Only this kind.
    pub kind: Option<Kind>,
}

impl Filter {
    /// Matches every transfer.
    pub fn all() -> Self {
        Filter::default()
    }

    /// Only this phase.
    pub fn phase(mut self, p: Phase) -> Self {
        self.phase = Some(p);
        self
    }

    /// Only this group.
    pub fn group(mut self, g: impl Into<String>) -> Self {
        self.group = Some(g.into());
        self
    }

    /// Only this session.
    pub fn session(mut self, s: impl Into<String>) -> Self {
        self.session = Some(s.into());
        self
    }

    /// Only this kind.
    pub fn kind(mut self, k: Kind) -> Self {
        self.kind = Some(k);
        self
    }

    fn matches(&self, t: &Transfer) -> bool {
        self.phase.is_none_or(|p| t.state.phase == p)
            && self
                .group
                .as_ref()
                .is_none_or(|g| t.manifest.group.as_ref() == Some(g))
            && self
                .session
                .as_ref()
                .is_none_or(|s| &t.manifest.session == s)
            && self.kind.is_none_or(|k| t.manifest.kind == k)
    }
}

impl Store {
    fn read_state(&self, id: TransferId) -> Result<State> {
        let dir = self.checked_dir(id)?;
        let path = dir.join(STATE);
        let read = || -> Result<Vec<u8>> {
            match self.core.fs.open_read(&path) {
                Ok(f) => state_file::read_slots(&self.core.fs, &f, &path),
                // Missing state: the transfer is being removed (NotFound), or the file was lost
                // (rebuilt below).
                Err(e) if e.is_not_found_io() => self.checked_dir(id).map(|_| Vec::new()),
                Err(e) => Err(e),
            }
        };
        let bytes = read()?;
        let (state, newest) = state_file::decode(id, &path, &bytes);
        if newest.is_some() || bytes.is_empty() {
            return Ok(state);
        }
        // Both slots invalid: two writes may have overlapped this lock-free read. Read again.
        let bytes = read()?;
        let (state, newest) = state_file::decode(id, &path, &bytes);
        if newest.is_none() {
            tracing::warn!(transfer = %id, "no valid state slot; state rebuilt from the manifest");
        }
        Ok(state)
    }

    /// Reads one transfer. Needs no lock: a torn state slot reads as the older one.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`], [`ErrorKind::Corrupt`] when the manifest fails its checks (the
    /// state never does: it is rebuilt and flagged), I/O errors.
    pub fn get(&self, id: TransferId) -> Result<Transfer> {
        self.core.fs.check()?;
        tracing::debug!(transfer = %id, "get");
        let manifest = self.manifest(id)?;
        let state = self.read_state(id)?;
        Ok(Transfer {
            manifest: (*manifest).clone(),
            state,
        })
    }

    /// Reads every record under `transfers/`: readable transfers, corrupt ones, and entries
    /// that are not transfers. Never reads payloads.
    ///
    /// # Errors
    /// I/O errors other than a damaged record (those are listed in [`Scan::corrupt`]);
    /// [`ErrorKind::Unavailable`] while the files cannot be read.
    pub fn scan(&self) -> Result<Scan> {
        self.core.fs.check()?;
        let dir = self.dir(TRANSFERS);
        let mut out = Scan::default();
        tracing::debug!("scan");
        for e in self.core.fs.list(&dir)? {
            let id = e.name.to_str().and_then(TransferId::parse_canonical);
            let Some(id) = id.filter(|_| e.is_dir && !e.is_symlink) else {
                out.unknown.push(dir.join(&e.name));
                continue;
            };
            let manifest = match self.manifest(id) {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => continue,
                Err(e)
                    if e.is_corrupt()
                        || matches!(e.kind(), ErrorKind::UnsupportedVersion { .. }) =>
                {
                    out.corrupt.push((id, e));
                    continue;
                }
                Err(e) => return Err(e),
            };
            match self.read_state(id) {
                Ok(state) => out.transfers.push(Transfer {
                    manifest: (*manifest).clone(),
                    state,
                }),
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {}
                Err(e) if e.is_corrupt() => out.corrupt.push((id, e)),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Lists transfers matching `filter`, in id order, without reading payloads. Corrupt
    /// records are skipped (see [`Store::scan`]). Read from the index while this handle holds
    /// it ([`StoreBuilder::index`]), else from the directories.
    ///
    /// # Errors
    /// As [`Store::scan`].
    pub fn list(&self, filter: &Filter) -> Result<Vec<Transfer>> {
        let mut v: Vec<Transfer> = self
            .gather(false)?
            .transfers
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        v.retain(|t| filter.matches(t));
        Ok(v)
    }

    /// Every readable transfer (with whether resume data is stored, when `resume` is asked
    /// for) and every corrupt record: from the index while this handle holds it, else from the
    /// directories.
    pub(crate) fn gather(&self, resume: bool) -> Result<Gathered> {
        self.core.fs.check()?;
        match self.index_records() {
            Some(records) => Ok(self.decode_indexed(&records)),
            None => self.gather_scanned(resume),
        }
    }

    /// [`Store::gather`] from the directories.
    pub(crate) fn gather_scanned(&self, resume: bool) -> Result<Gathered> {
        let scan = self.scan()?;
        let mut transfers = Vec::with_capacity(scan.transfers.len());
        for t in scan.transfers {
            let r = resume && t.manifest.kind == Kind::Download && self.has_resume_data(t.id())?;
            transfers.push((t, r));
        }
        Ok(Gathered {
            transfers,
            corrupt: scan.corrupt,
        })
    }

    /// Outcomes (succeeded, or failed for good) that wait for [`Store::acknowledge`].
    ///
    /// # Errors
    /// As [`Store::scan`].
    pub fn pending_outcomes(&self) -> Result<Vec<(TransferId, Outcome)>> {
        Ok(self
            .gather(false)?
            .transfers
            .into_iter()
            .map(|(t, _)| t)
            .filter(|t| matches!(t.state.phase, Phase::Completed | Phase::Failed))
            .filter_map(|t| t.state.outcome.clone().map(|o| (t.id(), o)))
            .collect())
    }

    fn rebuild_index(&self) -> Result<Vec<Transfer>> {
        let all: Vec<Transfer> = self
            .gather(false)?
            .transfers
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        let mut idx = TaskMap::default();
        for t in &all {
            if let Some(b) = &t.state.binding {
                idx.by_task.insert((b.session.clone(), b.task_id), t.id());
                if let Some(tag) = &b.tag {
                    idx.by_tag.insert(tag.clone(), t.id());
                }
            }
        }
        *lock(&self.tasks) = idx;
        Ok(all)
    }

    fn lookup(
        &self,
        key: impl Fn(&TaskMap) -> Option<TransferId>,
        accept: impl Fn(&Transfer) -> bool,
    ) -> Result<Option<Transfer>> {
        self.core.fs.check()?;
        let hit = key(&lock(&self.tasks));
        if let Some(id) = hit {
            match self.get(id) {
                Ok(t) if accept(&t) => return Ok(Some(t)),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        // A miss or a stale hit: another process may have bound the task. Rescan.
        Ok(self.rebuild_index()?.into_iter().find(|t| accept(t)))
    }

    /// The transfer bound to `(session, task_id)`, as a platform callback needs on every event.
    ///
    /// # Errors
    /// As [`Store::scan`].
    pub fn find_by_task(&self, session: &str, task_id: u64) -> Result<Option<Transfer>> {
        let key = (session.to_owned(), task_id);
        self.lookup(
            |i| i.by_task.get(&key).copied(),
            |t| {
                t.state
                    .binding
                    .as_ref()
                    .is_some_and(|b| b.session == session && b.task_id == task_id)
            },
        )
    }

    /// The transfer whose bound task carries `tag`, or, when no binding records it, the
    /// transfer whose id is `tag`.
    ///
    /// # Errors
    /// As [`Store::scan`].
    pub fn find_by_tag(&self, tag: &str) -> Result<Option<Transfer>> {
        let by_binding =
            |t: &Transfer| t.state.binding.as_ref().and_then(|b| b.tag.as_deref()) == Some(tag);
        if let Some(t) = self.lookup(|i| i.by_tag.get(tag).copied(), by_binding)? {
            return Ok(Some(t));
        }
        match TransferId::parse_canonical(tag).map(|id| self.get(id)) {
            Some(Ok(t)) => Ok(Some(t)),
            Some(Err(e)) if !matches!(e.kind(), ErrorKind::NotFound { .. }) => Err(e),
            _ => Ok(None),
        }
    }
}

/// What [`Store::gather`] found.
pub(crate) struct Gathered {
    pub(crate) transfers: Vec<(Transfer, bool)>,
    pub(crate) corrupt: Vec<(TransferId, Error)>,
}
