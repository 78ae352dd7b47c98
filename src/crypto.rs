//! Encryption at rest, per team (DESIGN §12). Each team has its own age X25519 identity,
//! generated on its first encrypted backup and stored wrapped — XChaCha20-Poly1305 under the
//! master key (`ENCRYPTION_KEY_FILE`), the team id as associated data — in `team_backup_keys`.
//! Backups need only the team's public recipient; restores and the verifier unwrap the identity
//! in memory (zeroized on drop), never logging it. Rotating the master key re-wraps identities and
//! touches no object; destroying a team's key makes every object encrypted to it unreadable.
//!
//! Each team key records the [fingerprint](MasterKey::fingerprint) of the master key that wrapped
//! it, and a rotation the one it re-wrapped it from: replicas still on the old key keep wrapping
//! first-time team keys under it while a rotation rolls out, so the start check
//! ([`check_master`]) tries every fingerprint group, tells keys a re-run of the rotation will
//! move from keys nothing opens, and `rotate_master` can be re-run until nothing is left.

use std::io::{Read, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use age::secrecy::ExposeSecret;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use sqlx::PgPool;
use uuid::Uuid;
use zeroize::Zeroizing;

const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the team's backup key was destroyed")]
    Destroyed,
    #[error("backup key {0} not found")]
    NotFound(Uuid),
    #[error(
        "the master key does not open the team key (wrong ENCRYPTION_KEY_FILE, or rotated since?)"
    )]
    WrongMasterKey,
    #[error(
        "the team key is wrapped under master key {wrapped_by}, not the configured {configured}: \
         a master key rotation is unfinished (run `backup-worker keys rotate-master` again with \
         ENCRYPTION_KEY_FILE holding {wrapped_by})"
    )]
    OtherMasterKey {
        wrapped_by: String,
        configured: String,
    },
    #[error("the stored team key is malformed: {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// The 32-byte master key. Never printed; zeroized on drop.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// Reads a master key file: mode 0600 or 0400, 32 bytes in base64. The message says what is
    /// wrong, never the contents.
    pub fn load(path: &Path) -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        let meta =
            std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if !meta.is_file() || !(mode == 0o600 || mode == 0o400) {
            return Err(format!(
                "{} must be a file with mode 0600 or 0400 (it is {mode:04o})",
                path.display()
            ));
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        );
        Self::from_base64(text.trim()).ok_or_else(|| {
            format!(
                "{} must hold 32 bytes in base64 (e.g. `openssl rand -base64 32`)",
                path.display()
            )
        })
    }

    pub fn from_base64(text: &str) -> Option<Self> {
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .ok()?,
        );
        let key: [u8; 32] = bytes.as_slice().try_into().ok()?;
        Some(Self(Zeroizing::new(key)))
    }

    /// Names this key without revealing it: the first 16 hex digits of
    /// sha256("backup-worker master key v1" ‖ key). Recorded on every team key it wraps.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"backup-worker master key v1");
        h.update(self.0.as_ref());
        hex::encode(&h.finalize()[..8])
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.0.as_ref().into())
    }

    /// nonce ‖ ciphertext of `identity`, bound to `team`.
    pub fn wrap(&self, team: Uuid, identity: &str) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: identity.as_bytes(),
                    aad: team.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    pub fn unwrap(&self, team: Uuid, wrapped: &[u8]) -> Result<Zeroizing<String>, KeyError> {
        if wrapped.len() <= NONCE_LEN {
            return Err(KeyError::Malformed("too short"));
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let plain = Zeroizing::new(
            self.cipher()
                .decrypt(
                    nonce.into(),
                    Payload {
                        msg: sealed,
                        aad: team.as_bytes(),
                    },
                )
                .map_err(|_| KeyError::WrongMasterKey)?,
        );
        String::from_utf8(plain.to_vec())
            .map(Zeroizing::new)
            .map_err(|_| KeyError::Malformed("not UTF-8"))
    }
}

/// The team's current key (created on first use): its id and public recipient. Two replicas
/// asking at once for a new team get the same key: one live key per team is a unique index.
pub async fn team_recipient(
    pool: &PgPool,
    master: &MasterKey,
    team: Uuid,
) -> Result<(Uuid, age::x25519::Recipient), KeyError> {
    for _ in 0..3 {
        let row: Option<(Uuid, String)> = sqlx::query_as(
            "SELECT key_id, recipient FROM team_backup_keys
              WHERE team_id = $1 AND destroyed_at IS NULL",
        )
        .bind(team)
        .fetch_optional(pool)
        .await?;
        if let Some((key_id, recipient)) = row {
            let recipient = age::x25519::Recipient::from_str(&recipient)
                .map_err(|_| KeyError::Malformed("recipient"))?;
            return Ok((key_id, recipient));
        }
        let identity = age::x25519::Identity::generate();
        let recipient = identity.to_public().to_string();
        let wrapped = master.wrap(team, identity.to_string().expose_secret());
        sqlx::query(
            "INSERT INTO team_backup_keys (team_id, key_id, recipient, wrapped_identity,
                                           master_fingerprint)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (team_id) WHERE destroyed_at IS NULL DO NOTHING",
        )
        .bind(team)
        .bind(Uuid::new_v4())
        .bind(&recipient)
        .bind(&wrapped)
        .bind(master.fingerprint())
        .execute(pool)
        .await?;
        // Whoever won, the row now there is the key.
    }
    Err(KeyError::Malformed("no key after three attempts"))
}

/// The identity that opens objects encrypted to `key_id`, unwrapped in memory.
pub async fn identity(
    pool: &PgPool,
    master: &MasterKey,
    key_id: Uuid,
) -> Result<age::x25519::Identity, KeyError> {
    let row: Option<(Uuid, Option<Vec<u8>>, Option<String>)> = sqlx::query_as(
        "SELECT team_id, wrapped_identity, master_fingerprint FROM team_backup_keys
          WHERE key_id = $1",
    )
    .bind(key_id)
    .fetch_optional(pool)
    .await?;
    let (team, wrapped, wrapped_by) = row.ok_or(KeyError::NotFound(key_id))?;
    let wrapped = wrapped.ok_or(KeyError::Destroyed)?;
    let text = master
        .unwrap(team, &wrapped)
        .map_err(|e| other_master_key(e, master, wrapped_by))?;
    age::x25519::Identity::from_str(&text).map_err(|_| KeyError::Malformed("identity"))
}

/// A key the master key does not open, recorded as wrapped under another master key, says which.
fn other_master_key(e: KeyError, master: &MasterKey, wrapped_by: Option<String>) -> KeyError {
    let configured = master.fingerprint();
    match (e, wrapped_by) {
        (KeyError::WrongMasterKey, Some(wrapped_by)) if wrapped_by != configured => {
            KeyError::OtherMasterKey {
                wrapped_by,
                configured,
            }
        }
        (e, _) => e,
    }
}

/// Live team keys wrapped under one master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGroup {
    /// The master key's fingerprint; `None`: not recorded (wrapped before fingerprints were) and
    /// not opened by the configured key.
    pub fingerprint: Option<String>,
    pub keys: u64,
    /// Some of its teams (at most [`TEAMS_NAMED`]), newest key first.
    pub teams: Vec<Uuid>,
}

/// Teams named per group in messages.
pub const TEAMS_NAMED: usize = 5;

impl std::fmt::Display for KeyGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.fingerprint {
            Some(fp) => write!(f, "{} under master key {fp}", self.keys)?,
            None => write!(f, "{} under an unrecorded master key", self.keys)?,
        }
        let teams: Vec<String> = self.teams.iter().map(Uuid::to_string).collect();
        let more = if (self.keys as usize) > self.teams.len() {
            ", …"
        } else {
            ""
        };
        write!(f, " (team {}{more})", teams.join(", "))
    }
}

/// What the start check found (DESIGN §12).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MasterCheck {
    /// The configured master key's fingerprint.
    pub fingerprint: String,
    /// Live team keys.
    pub keys: u64,
    /// Keys without a recorded fingerprint that the configured key opened: recorded now.
    pub recorded: u64,
    /// Keys still under a master key a rotation to the configured one started from (replicas
    /// still on the old key wrapped them since): the rotation's re-run moves them. Their
    /// restores fail until then.
    pub unfinished_rotation: Vec<KeyGroup>,
    /// Keys the configured key does not open and no rotation to it explains.
    pub unopened: Vec<KeyGroup>,
    /// Master keys that team keys were rotated to from the configured one: it is retired.
    pub rotated_to: Vec<String>,
}

impl MasterCheck {
    /// Why a worker must not start with this key (one line), if it must not.
    pub fn refusal(&self) -> Option<String> {
        if self.unopened.is_empty() {
            return None;
        }
        let missing: u64 = self.unopened.iter().map(|g| g.keys).sum();
        let groups: Vec<String> = self.unopened.iter().map(ToString::to_string).collect();
        let mut why = format!(
            "the master key (fingerprint {}) does not open {missing} of {} team key(s): {}",
            self.fingerprint,
            self.keys,
            groups.join("; ")
        );
        if !self.rotated_to.is_empty() {
            why.push_str(&format!(
                "; this key was rotated to master key {}: point ENCRYPTION_KEY_FILE at that key",
                self.rotated_to.join(", ")
            ));
        }
        Some(why)
    }

    /// What to log when a rotation to this key is unfinished.
    pub fn warning(&self) -> Option<String> {
        if self.unfinished_rotation.is_empty() {
            return None;
        }
        let groups: Vec<String> = self
            .unfinished_rotation
            .iter()
            .map(ToString::to_string)
            .collect();
        Some(format!(
            "a master key rotation to this key (fingerprint {}) is unfinished: {} team key(s) are still under the key it replaces ({}); once every replica runs this key, run `backup-worker keys rotate-master` again with ENCRYPTION_KEY_FILE holding the old key; until then those teams' restores fail",
            self.fingerprint,
            self.unfinished_rotation.iter().map(|g| g.keys).sum::<u64>(),
            groups.join("; ")
        ))
    }
}

/// Rows per batch of the fingerprint fill-in and of a rotation.
const KEY_BATCH: i64 = 1000;

/// The start check: every live team key is tried, one unwrap per master-key fingerprint (keys
/// without a recorded one are each tried, and recorded when they open). A wrong or stale
/// ENCRYPTION_KEY_FILE is found at start, not at the first restore; keys left under the key a
/// rotation to this one replaces are reported apart (a re-run of the rotation moves them).
pub async fn check_master(pool: &PgPool, master: &MasterKey) -> Result<MasterCheck, KeyError> {
    let me = master.fingerprint();
    let mut check = MasterCheck {
        fingerprint: me.clone(),
        ..MasterCheck::default()
    };

    // Keys wrapped before fingerprints were recorded: each one tried, the ones it opens
    // recorded (only if still wrapped the same: a concurrent rotation wins).
    let mut unrecorded = KeyGroup {
        fingerprint: None,
        keys: 0,
        teams: Vec::new(),
    };
    let mut after = Uuid::nil();
    loop {
        let rows: Vec<(Uuid, Uuid, Vec<u8>)> = sqlx::query_as(
            "SELECT key_id, team_id, wrapped_identity FROM team_backup_keys
              WHERE destroyed_at IS NULL AND master_fingerprint IS NULL AND key_id > $1
              ORDER BY key_id LIMIT $2",
        )
        .bind(after)
        .bind(KEY_BATCH)
        .fetch_all(pool)
        .await?;
        let Some(last) = rows.last().map(|r| r.0) else {
            break;
        };
        after = last;
        let (mut ids, mut wrapped) = (Vec::new(), Vec::new());
        for (key_id, team, w) in rows {
            if master.unwrap(team, &w).is_ok() {
                ids.push(key_id);
                wrapped.push(w);
            } else {
                unrecorded.keys += 1;
                if unrecorded.teams.len() < TEAMS_NAMED {
                    unrecorded.teams.push(team);
                }
            }
        }
        check.recorded += sqlx::query(
            "UPDATE team_backup_keys t SET master_fingerprint = $1
               FROM unnest($2::uuid[], $3::bytea[]) AS u(key_id, wrapped)
              WHERE t.key_id = u.key_id AND t.wrapped_identity = u.wrapped
                AND t.master_fingerprint IS NULL",
        )
        .bind(&me)
        .bind(&ids)
        .bind(&wrapped)
        .execute(pool)
        .await?
        .rows_affected();
    }

    // Every fingerprint group: its size, some teams, where a rotation moved it from, and the
    // newest key as the one to try.
    let groups: Vec<(String, Option<String>, i64, Vec<Uuid>)> = sqlx::query_as(
        "SELECT master_fingerprint, previous_fingerprint, count(*),
                (array_agg(team_id ORDER BY created_at DESC))[1:$1]
           FROM team_backup_keys
          WHERE destroyed_at IS NULL AND master_fingerprint IS NOT NULL
          GROUP BY master_fingerprint, previous_fingerprint",
    )
    .bind(TEAMS_NAMED as i32)
    .fetch_all(pool)
    .await?;
    let samples: Vec<(String, Uuid, Vec<u8>)> = sqlx::query_as(
        "SELECT DISTINCT ON (master_fingerprint) master_fingerprint, team_id, wrapped_identity
           FROM team_backup_keys
          WHERE destroyed_at IS NULL AND master_fingerprint IS NOT NULL
          ORDER BY master_fingerprint, created_at DESC",
    )
    .fetch_all(pool)
    .await?;
    // The master keys rotations to this one started from.
    let replaced: Vec<&str> = groups
        .iter()
        .filter(|(fp, prev, ..)| *fp == me && prev.is_some())
        .filter_map(|(_, prev, ..)| prev.as_deref())
        .collect();
    // The recorded ones are in their group now.
    check.keys = unrecorded.keys;
    for (fp, team, wrapped) in &samples {
        let mut group = KeyGroup {
            fingerprint: Some(fp.clone()),
            keys: 0,
            teams: Vec::new(),
        };
        for (_, prev, n, teams) in groups.iter().filter(|g| &g.0 == fp) {
            group.keys += *n as u64;
            group.teams.extend(
                teams
                    .iter()
                    .take(TEAMS_NAMED - group.teams.len().min(TEAMS_NAMED)),
            );
            if prev.as_deref() == Some(me.as_str()) && !check.rotated_to.contains(fp) {
                check.rotated_to.push(fp.clone());
            }
        }
        check.keys += group.keys;
        if master.unwrap(*team, wrapped).is_ok() {
            continue;
        }
        if replaced.contains(&fp.as_str()) {
            check.unfinished_rotation.push(group);
        } else {
            check.unopened.push(group);
        }
    }
    if unrecorded.keys > 0 {
        check.unopened.push(unrecorded);
    }
    Ok(check)
}

/// What one run of `keys rotate-master` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// Team keys re-wrapped under the new master key by this run.
    pub rewrapped: u64,
    /// Live team keys under neither key, or that the old key did not open: no run moves them.
    pub remaining: Vec<KeyGroup>,
}

/// Re-wraps every live team identity under `old` (recorded so, or not recorded and opened by it)
/// under `new`, recording both fingerprints; no object is touched. Batches of [`KEY_BATCH`], each
/// its own transaction. Re-runnable: a run after replicas still on the old key wrapped
/// first-time team keys moves those; keys already under `new` are left alone.
pub async fn rotate_master(
    pool: &PgPool,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<Rotation, KeyError> {
    let (old_fp, new_fp) = (old.fingerprint(), new.fingerprint());
    let mut rewrapped = 0;
    let mut skipped = std::collections::BTreeMap::<Option<String>, KeyGroup>::new();
    let mut after = Uuid::nil();
    loop {
        let mut tx = pool.begin().await?;
        let rows: Vec<(Uuid, Uuid, Vec<u8>, Option<String>)> = sqlx::query_as(
            "SELECT key_id, team_id, wrapped_identity, master_fingerprint FROM team_backup_keys
              WHERE destroyed_at IS NULL AND key_id > $1
                AND (master_fingerprint IS NULL OR master_fingerprint = $2)
              ORDER BY key_id LIMIT $3
                FOR UPDATE",
        )
        .bind(after)
        .bind(&old_fp)
        .bind(KEY_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last().map(|r| r.0) else {
            break;
        };
        after = last;
        for (key_id, team, wrapped, fp) in rows {
            let Ok(identity) = old.unwrap(team, &wrapped) else {
                // Not the old key's after all (unrecorded, or mislabelled): reported below.
                let g = skipped.entry(fp.clone()).or_insert_with(|| KeyGroup {
                    fingerprint: fp,
                    keys: 0,
                    teams: Vec::new(),
                });
                g.keys += 1;
                if g.teams.len() < TEAMS_NAMED {
                    g.teams.push(team);
                }
                continue;
            };
            sqlx::query(
                "UPDATE team_backup_keys
                    SET wrapped_identity = $2, master_fingerprint = $3, previous_fingerprint = $4
                  WHERE key_id = $1",
            )
            .bind(key_id)
            .bind(new.wrap(team, &identity))
            .bind(&new_fp)
            .bind(&old_fp)
            .execute(&mut *tx)
            .await?;
            rewrapped += 1;
        }
        tx.commit().await?;
    }
    // What is left under neither key.
    let others: Vec<(String, i64, Vec<Uuid>)> = sqlx::query_as(
        "SELECT master_fingerprint, count(*), (array_agg(team_id ORDER BY created_at DESC))[1:$3]
           FROM team_backup_keys
          WHERE destroyed_at IS NULL AND master_fingerprint NOT IN ($1, $2)
          GROUP BY master_fingerprint ORDER BY master_fingerprint",
    )
    .bind(&old_fp)
    .bind(&new_fp)
    .bind(TEAMS_NAMED as i32)
    .fetch_all(pool)
    .await?;
    let mut remaining: Vec<KeyGroup> = others
        .into_iter()
        .map(|(fp, n, teams)| KeyGroup {
            fingerprint: Some(fp),
            keys: n as u64,
            teams,
        })
        .collect();
    remaining.extend(skipped.into_values());
    Ok(Rotation {
        rewrapped,
        remaining,
    })
}

/// What `keys destroy` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destroyed {
    pub keys: u64,
    pub backups_expired: u64,
}

/// Crypto-shreds a team's backups at once: its key's wrapped identity is erased (no master key
/// opens its objects any more), every succeeded backup of the team is marked `expired`, and their
/// objects are queued for deletion in the background. Audit `keys.destroyed`. The team's next
/// backup gets a new key.
pub async fn destroy(pool: &PgPool, team: Uuid) -> Result<Destroyed, KeyError> {
    let mut tx = pool.begin().await?;
    let keys = sqlx::query(
        "UPDATE team_backup_keys SET wrapped_identity = NULL, destroyed_at = now()
          WHERE team_id = $1 AND destroyed_at IS NULL",
    )
    .bind(team)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(
        "INSERT INTO pending_object_deletions (object_key, reason)
         SELECT b.object_key, 'keys.destroyed' FROM resource_backups b
           JOIN resources r ON r.id = b.resource_id
          WHERE r.team_id = $1 AND b.status = 'succeeded' AND b.object_key IS NOT NULL
         ON CONFLICT (object_key) DO NOTHING",
    )
    .bind(team)
    .execute(&mut *tx)
    .await?;
    let backups_expired = sqlx::query(
        "UPDATE resource_backups b SET status = 'expired'
           FROM resources r
          WHERE r.id = b.resource_id AND r.team_id = $1 AND b.status = 'succeeded'",
    )
    .bind(team)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    crate::db::audit(
        &mut *tx,
        "keys.destroyed",
        Some(team),
        None,
        None,
        serde_json::json!({ "keys_destroyed": keys, "backups_expired": backups_expired }),
    )
    .await?;
    tx.commit().await?;
    Ok(Destroyed {
        keys,
        backups_expired,
    })
}

/// The team's live identity as text (`AGE-SECRET-KEY-1…`), for decrypting a backup by hand.
pub async fn export_identity(
    pool: &PgPool,
    master: &MasterKey,
    team: Uuid,
) -> Result<Zeroizing<String>, KeyError> {
    let row: Option<Option<Vec<u8>>> = sqlx::query_scalar(
        "SELECT wrapped_identity FROM team_backup_keys WHERE team_id = $1
          ORDER BY destroyed_at IS NULL DESC, created_at DESC LIMIT 1",
    )
    .bind(team)
    .fetch_optional(pool)
    .await?;
    match row {
        None => Err(KeyError::NotFound(team)),
        Some(None) => Err(KeyError::Destroyed),
        Some(Some(wrapped)) => master.unwrap(team, &wrapped),
    }
}

/// A `Write` sink the encryptor writes into and the pipeline drains after every chunk.
#[derive(Clone, Default)]
struct Drain(Arc<Mutex<Vec<u8>>>);

impl Write for Drain {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The age encryption of a stream, fed chunk by chunk: what goes in is gzip, what comes out is
/// stored. Memory: one age chunk (64 KiB) plus what the caller drains.
pub struct Encrypt {
    writer: age::stream::StreamWriter<Drain>,
    out: Drain,
}

impl Encrypt {
    pub fn new(recipient: &age::x25519::Recipient) -> std::io::Result<Self> {
        let out = Drain::default();
        let encryptor =
            age::Encryptor::with_recipients(std::iter::once(recipient as &dyn age::Recipient))
                .map_err(std::io::Error::other)?;
        let writer = encryptor.wrap_output(out.clone())?;
        Ok(Self { writer, out })
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.out.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Encrypts `data`; returns the ciphertext produced so far.
    pub fn push(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        self.writer.write_all(data)?;
        Ok(self.take())
    }

    /// Ends the stream (the last, authenticated chunk); returns the rest of the ciphertext.
    pub fn finish(self) -> std::io::Result<Vec<u8>> {
        let out = self.out.clone();
        self.writer.finish()?;
        let rest = std::mem::take(&mut *out.0.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(rest)
    }
}

/// A decryption error surfaced through `std::io::Read` by [`DecryptingReader`]: callers tell a
/// backup that does not decrypt (tampered, wrong key) from one that does not decompress.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecryptError(pub String);

/// An age file decrypted as it is read (blocking): nothing decrypted ever lands on disk. Any
/// tampering fails the authentication of its chunk, as a [`DecryptError`].
pub struct DecryptingReader(Box<dyn Read + Send>);

impl DecryptingReader {
    pub fn new<R: Read + Send + 'static>(
        identity: &age::x25519::Identity,
        input: R,
    ) -> std::io::Result<Self> {
        let err =
            |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, DecryptError(why));
        let decryptor = age::Decryptor::new(std::io::BufReader::with_capacity(64 * 1024, input))
            .map_err(|e| err(format!("not an age file: {e}")))?;
        let reader = decryptor
            .decrypt(std::iter::once(identity as &dyn age::Identity))
            .map_err(|e| err(format!("the team's key does not open it: {e}")))?;
        Ok(Self(Box::new(reader)))
    }
}

impl Read for DecryptingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::Interrupted {
                e
            } else {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    DecryptError(format!("decrypting: {e}")),
                )
            }
        })
    }
}

/// Whether an I/O error is a [`DecryptError`].
pub fn is_decrypt_error(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<DecryptError>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_binds_the_team_and_the_key() {
        let k =
            MasterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([7u8; 32]))
                .unwrap();
        let other =
            MasterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([8u8; 32]))
                .unwrap();
        let team = Uuid::new_v4();
        let w = k.wrap(team, "AGE-SECRET-KEY-1XYZ");
        assert_eq!(&*k.unwrap(team, &w).unwrap(), "AGE-SECRET-KEY-1XYZ");
        assert!(matches!(
            k.unwrap(Uuid::new_v4(), &w),
            Err(KeyError::WrongMasterKey)
        ));
        assert!(matches!(
            other.unwrap(team, &w),
            Err(KeyError::WrongMasterKey)
        ));
        assert!(MasterKey::from_base64("c2hvcnQ=").is_none());
        assert_eq!(format!("{k:?}"), "MasterKey(<redacted>)");
    }

    #[test]
    fn fingerprints_are_stable_and_reveal_nothing() {
        let k =
            MasterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([7u8; 32]))
                .unwrap();
        // Recorded on every team key: the scheme must never change silently.
        assert_eq!(k.fingerprint(), "cffb4cb8f72e3e95");
        let other =
            MasterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([8u8; 32]))
                .unwrap();
        assert_ne!(k.fingerprint(), other.fingerprint());
        assert!(!k.fingerprint().contains(&hex::encode([7u8; 8])));
    }

    #[test]
    fn the_check_refuses_only_keys_no_rotation_explains() {
        let team = Uuid::nil();
        let group = |fp: Option<&str>| KeyGroup {
            fingerprint: fp.map(str::to_owned),
            keys: 7,
            teams: vec![team; TEAMS_NAMED],
        };
        let mut check = MasterCheck {
            fingerprint: "aaaa".into(),
            keys: 20,
            unfinished_rotation: vec![group(Some("bbbb"))],
            ..MasterCheck::default()
        };
        assert_eq!(check.refusal(), None);
        let warning = check.warning().unwrap();
        assert!(warning.contains("unfinished") && warning.contains("7 under master key bbbb"));
        check.unopened = vec![group(Some("cccc")), group(None)];
        check.rotated_to = vec!["dddd".into()];
        let why = check.refusal().unwrap();
        assert!(!why.contains('\n'), "one line: {why}");
        assert!(
            why.contains("does not open 14 of 20")
                && why.contains(
                    "7 under master key cccc (team 00000000-0000-0000-0000-000000000000, "
                )
                && why.contains("…)")
                && why.contains("7 under an unrecorded master key")
                && why.contains("rotated to master key dddd"),
            "{why}"
        );
    }

    #[test]
    fn stream_round_trip() {
        let id = age::x25519::Identity::generate();
        let mut e = Encrypt::new(&id.to_public()).unwrap();
        let data: Vec<u8> = (0..500_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let mut stored = Vec::new();
        for chunk in data.chunks(100_000) {
            stored.extend(e.push(chunk).unwrap());
        }
        stored.extend(e.finish().unwrap());
        assert!(stored.starts_with(b"age-encryption.org/v1"));
        let mut plain = Vec::new();
        DecryptingReader::new(&id, std::io::Cursor::new(stored.clone()))
            .unwrap()
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, data);
        let mut bad = stored.clone();
        let at = bad.len() - 100;
        bad[at] ^= 1;
        let err = DecryptingReader::new(&id, std::io::Cursor::new(bad))
            .unwrap()
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(is_decrypt_error(&err), "{err}");
        let other = age::x25519::Identity::generate();
        let Err(err) = DecryptingReader::new(&other, std::io::Cursor::new(stored)) else {
            panic!("another team's key opened it");
        };
        assert!(is_decrypt_error(&err), "{err}");
    }
}
