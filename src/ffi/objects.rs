//! Object functions: attributes, find, and session objects (create, copy, destroy, modify).
//! Token objects (configured certificates, released keys) are read-only: the token is
//! write-protected; session objects follow `token::factory`.

use super::{bad, input, instance, out, p11_fn};
use crate::error::{Error, Result};
use crate::token::attr::{self, Attr, Entry};
use crate::token::factory;
use crate::token::material;
use crate::token::object::Object;
use crate::token::session::Find;
use crate::token::Token;
use cryptoki_sys::*;
use std::sync::Arc;

/// Largest attribute value accepted in a template.
const MAX_TEMPLATE_VALUE: CK_ULONG = 64 * 1024;
/// Most entries in a template (and in a nested attribute array).
const MAX_TEMPLATE_ENTRIES: CK_ULONG = 4096;

fn write_protected() -> Error {
    Error::new(
        CKR_TOKEN_WRITE_PROTECTED,
        "the token is read-only: its objects come from configuration and the key release",
    )
}

/// A caller's template: (type, value) pairs, secret values wiped when dropped.
pub(crate) struct OwnedTemplate(pub Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>);

impl Drop for OwnedTemplate {
    fn drop(&mut self) {
        for (_, v) in &mut self.0 {
            crate::secret::wipe(v);
        }
    }
}

impl std::ops::Deref for OwnedTemplate {
    type Target = [(CK_ATTRIBUTE_TYPE, Vec<u8>)];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// Copy a caller's template. An attribute array (CKF_ARRAY_ATTRIBUTE: CKA_WRAP_TEMPLATE,
/// CKA_UNWRAP_TEMPLATE) is read one level deep and kept encoded (`attr::encode_template`).
///
/// # Safety
/// `p` is NULL or points to `count` CK_ATTRIBUTEs whose pValue are valid for ulValueLen.
pub(crate) unsafe fn read_template(
    p: *const CK_ATTRIBUTE,
    count: CK_ULONG,
) -> Result<OwnedTemplate> {
    // SAFETY: forwarded caller contract.
    unsafe { read_template_depth(p, count, true) }
}

/// # Safety
/// As `read_template`.
unsafe fn read_template_depth(
    p: *const CK_ATTRIBUTE,
    count: CK_ULONG,
    nest: bool,
) -> Result<OwnedTemplate> {
    if count == 0 {
        return Ok(OwnedTemplate(vec![]));
    }
    if p.is_null() || count > MAX_TEMPLATE_ENTRIES {
        return Err(bad("pTemplate is NULL or has an impossible count"));
    }
    let mut v = OwnedTemplate(Vec::with_capacity(count as usize));
    for i in 0..count as usize {
        // SAFETY: the caller's array holds `count` entries.
        let a = unsafe { p.add(i).read_unaligned() };
        if a.type_ & CKF_ARRAY_ATTRIBUTE != 0 && nest {
            let size = std::mem::size_of::<CK_ATTRIBUTE>() as CK_ULONG;
            if a.ulValueLen % size != 0 || (a.pValue.is_null() && a.ulValueLen != 0) {
                return Err(bad(
                    "attribute array: NULL or a length that is not whole entries",
                ));
            }
            // SAFETY: pValue holds ulValueLen / size CK_ATTRIBUTEs per the API.
            let inner = unsafe {
                read_template_depth(a.pValue as *const CK_ATTRIBUTE, a.ulValueLen / size, false)?
            };
            v.0.push((a.type_, attr::encode_template(&inner)));
            continue;
        }
        if a.ulValueLen > MAX_TEMPLATE_VALUE {
            return Err(Error::new(
                CKR_ATTRIBUTE_VALUE_INVALID,
                format!("attribute {:#x} value too long", a.type_),
            ));
        }
        // SAFETY: pValue is valid for ulValueLen bytes per the API.
        let val = unsafe { input(a.pValue as *const u8, a.ulValueLen, "template value")? };
        v.0.push((a.type_, val.to_vec()));
    }
    Ok(v)
}

/// A new object handle's out-pointer, checked before anything else is done.
pub(crate) fn handle_out(ph: *mut CK_OBJECT_HANDLE, what: &str) -> Result<()> {
    if ph.is_null() {
        return Err(bad(&format!("{what} is NULL")));
    }
    Ok(())
}

/// A session object may be private only while logged in.
pub(crate) fn check_login_for(t: &Token, o: &Object) -> Result<()> {
    if o.is_private() && !t.is_logged_in() {
        return Err(Error::new(
            CKR_USER_NOT_LOGGED_IN,
            "private objects (CKA_PRIVATE = TRUE, the default for keys) need C_Login first",
        ));
    }
    Ok(())
}

/// Add a new session object and return its handle through `ph`.
///
/// # Safety
/// `ph` is a valid, non-NULL out-pointer.
pub(crate) unsafe fn install(t: &Token, o: Object, ph: *mut CK_OBJECT_HANDLE) -> Result<()> {
    check_login_for(t, &o)?;
    let h = t.add_session_object(o);
    // SAFETY: checked non-NULL API out-pointer.
    unsafe { out(ph, h, "phObject") }
}

/// A session object the caller may change, or why not.
fn modifiable(t: &Token, h: CK_OBJECT_HANDLE) -> Result<Arc<Object>> {
    let o = t.object(h)?;
    if !o.is_session() {
        return Err(write_protected());
    }
    Ok(o)
}

/// Answer one attribute-array entry of C_GetAttributeValue (the nested size-query rules).
///
/// # Safety
/// `a.pValue` is non-NULL and valid for `a.ulValueLen` bytes.
unsafe fn answer_nested(
    a: &CK_ATTRIBUTE,
    entries: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> (CK_ULONG, Entry) {
    let size = std::mem::size_of::<CK_ATTRIBUTE>();
    let need = entries.len() * size;
    if (a.ulValueLen as usize) < need {
        return (
            CK_UNAVAILABLE_INFORMATION,
            Entry::Unavailable(CKR_BUFFER_TOO_SMALL),
        );
    }
    let arr = a.pValue as *mut CK_ATTRIBUTE;
    let mut short = false;
    for (i, (ty, v)) in entries.iter().enumerate() {
        // SAFETY: the caller's array holds ulValueLen / size ≥ entries.len() entries.
        let slot = unsafe { arr.add(i) };
        let inner = unsafe { slot.read_unaligned() };
        let len = if inner.pValue.is_null() {
            v.len() as CK_ULONG
        } else if inner.ulValueLen as usize >= v.len() {
            // SAFETY: the inner buffer holds ulValueLen ≥ v.len() bytes.
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), inner.pValue as *mut u8, v.len()) };
            v.len() as CK_ULONG
        } else {
            short = true;
            CK_UNAVAILABLE_INFORMATION
        };
        // SAFETY: writing the fields of the caller's entry.
        unsafe {
            std::ptr::addr_of_mut!((*slot).type_).write_unaligned(*ty);
            std::ptr::addr_of_mut!((*slot).ulValueLen).write_unaligned(len);
        }
    }
    let e = if short {
        Entry::Unavailable(CKR_BUFFER_TOO_SMALL)
    } else {
        Entry::Length(need)
    };
    (need as CK_ULONG, e)
}

p11_fn! {
    fn C_CreateObject(h: CK_SESSION_HANDLE, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG, ph: *mut CK_OBJECT_HANDLE) [h, count] {
        let inst = instance()?;
        handle_out(ph, "phObject")?;
        // SAFETY: API template.
        let template = unsafe { read_template(p_template, count)? };
        let (_, t) = inst.module.session_token(h)?;
        let o = material::create(h, &template)?;
        // SAFETY: checked API out-pointer.
        unsafe { install(t, o, ph) }
    }

    fn C_CopyObject(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG, ph: *mut CK_OBJECT_HANDLE) [h, obj, count] {
        let inst = instance()?;
        handle_out(ph, "phNewObject")?;
        // SAFETY: API template.
        let template = unsafe { read_template(p_template, count)? };
        let (_, t) = inst.module.session_token(h)?;
        let o = t.object(obj)?;
        let Some(stored) = o.stored.as_ref().filter(|_| o.flag(CKA_COPYABLE)) else {
            return Err(Error::new(CKR_ACTION_PROHIBITED, "this object cannot be copied (CKA_COPYABLE = FALSE)"));
        };
        let attrs = factory::modify(&stored.attrs, &template, true)?;
        let copy = material::with_attrs(&o, attrs, Some(h));
        // SAFETY: checked API out-pointer.
        unsafe { install(t, copy, ph) }
    }

    fn C_DestroyObject(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE) [h, obj] {
        let inst = instance()?;
        let (_, t) = inst.module.session_token(h)?;
        let o = modifiable(t, obj)?;
        if !o.flag(CKA_DESTROYABLE) {
            return Err(Error::new(CKR_ACTION_PROHIBITED, "this object cannot be destroyed (CKA_DESTROYABLE = FALSE)"));
        }
        drop(o);
        t.remove_session_object(obj)
    }

    fn C_GetObjectSize(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, pul_size: *mut CK_ULONG) [h, obj] {
        let inst = instance()?;
        if pul_size.is_null() {
            return Err(bad("pulSize is NULL"));
        }
        let (_, t) = inst.module.session_token(h)?;
        let o = t.object(obj)?;
        let size = o.size().map_or(CK_UNAVAILABLE_INFORMATION, |n| n as CK_ULONG);
        // SAFETY: API out-pointer.
        unsafe { out(pul_size, size, "pulSize") }
    }

    fn C_GetAttributeValue(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG) [h, obj, count] {
        let inst = instance()?;
        if count > 0 && (p_template.is_null() || count > MAX_TEMPLATE_ENTRIES) {
            return Err(bad("pTemplate is NULL or has an impossible count"));
        }
        let (_, t) = inst.module.session_token(h)?;
        let o = t.object(obj)?;
        if count == 0 {
            return Ok(());
        }
        let mut entries = Vec::with_capacity(count as usize);
        // Every entry is answered, whatever happens to the others (§3.1 rule 1).
        for i in 0..count as usize {
            // SAFETY: the caller's template holds `count` entries.
            let slot = unsafe { p_template.add(i) };
            let a = unsafe { slot.read_unaligned() };
            let buffer = (!a.pValue.is_null()).then_some(a.ulValueLen as usize);
            let (len, e) = match (o.attribute(a.type_), buffer) {
                // SAFETY: non-NULL pValue of ulValueLen bytes per the API.
                (Attr::Nested(v), Some(_)) => unsafe { answer_nested(&a, &v) },
                (value, _) => {
                    let e = attr::answer(value, buffer);
                    let len = match &e {
                        Entry::Length(n) => *n as CK_ULONG,
                        Entry::Copy(v) => {
                            // SAFETY: pValue holds ulValueLen ≥ v.len() bytes (checked by `answer`).
                            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), a.pValue as *mut u8, v.len()) };
                            v.len() as CK_ULONG
                        }
                        Entry::Unavailable(_) => CK_UNAVAILABLE_INFORMATION,
                    };
                    (len, e)
                }
            };
            // SAFETY: writing the ulValueLen field of the caller's entry.
            unsafe { std::ptr::addr_of_mut!((*slot).ulValueLen).write_unaligned(len) };
            entries.push(e);
        }
        match attr::combine(&entries) {
            CKR_OK => Ok(()),
            rv => Err(Error::new(rv, "some attributes are unavailable (see their lengths)")),
        }
    }

    fn C_SetAttributeValue(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG) [h, obj, count] {
        let inst = instance()?;
        // SAFETY: API template.
        let template = unsafe { read_template(p_template, count)? };
        let (_, t) = inst.module.session_token(h)?;
        let o = modifiable(t, obj)?;
        if !o.flag(CKA_MODIFIABLE) {
            return Err(Error::new(CKR_ACTION_PROHIBITED, "this object cannot be modified (CKA_MODIFIABLE = FALSE)"));
        }
        let current = o.stored.as_ref().map(|s| s.attrs.clone()).unwrap_or_default();
        let attrs = factory::modify(&current, &template, false)?;
        t.replace_session_object(material::with_attrs(&o, attrs, None))
    }

    fn C_FindObjectsInit(h: CK_SESSION_HANDLE, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG) [h, count] {
        let inst = instance()?;
        // SAFETY: API template.
        let template = unsafe { read_template(p_template, count)? };
        let (s, t) = inst.module.session_token(h)?;
        if s.lock().find.is_some() {
            return Err(Error::new(CKR_OPERATION_ACTIVE, "a find is already active on this session"));
        }
        // A lookup is where an application (re)loads its keys: serve the current versions.
        super::general::follow_lookup(&inst, t);
        let mut g = s.lock();
        if g.find.is_some() {
            return Err(Error::new(CKR_OPERATION_ACTIVE, "a find is already active on this session"));
        }
        let handles = t
            .visible_objects()
            .iter()
            .filter(|o| o.matches(&template))
            .map(|o| o.handle)
            .collect();
        g.find = Some(Find { handles, pos: 0 });
        Ok(())
    }

    fn C_FindObjects(h: CK_SESSION_HANDLE, ph_object: *mut CK_OBJECT_HANDLE, max: CK_ULONG, pul_count: *mut CK_ULONG) [h, max] {
        let inst = instance()?;
        if pul_count.is_null() || (ph_object.is_null() && max > 0) {
            return Err(bad("phObject or pulObjectCount is NULL"));
        }
        let (s, _) = inst.module.session_token(h)?;
        let mut g = s.lock();
        let f = g
            .find
            .as_mut()
            .ok_or_else(|| Error::new(CKR_OPERATION_NOT_INITIALIZED, "C_FindObjectsInit was not called"))?;
        let found = f.next(max.min(1 << 20) as usize);
        for (i, o) in found.iter().enumerate() {
            // SAFETY: the caller's array holds `max` ≥ found.len() entries.
            unsafe { ph_object.add(i).write_unaligned(*o) };
        }
        // SAFETY: checked non-NULL API out-pointer.
        unsafe { out(pul_count, found.len() as CK_ULONG, "pulObjectCount") }
    }

    fn C_FindObjectsFinal(h: CK_SESSION_HANDLE) [h] {
        let inst = instance()?;
        let (s, _) = inst.module.session_token(h)?;
        let mut g = s.lock();
        if g.find.take().is_none() {
            return Err(Error::new(CKR_OPERATION_NOT_INITIALIZED, "C_FindObjectsInit was not called"));
        }
        Ok(())
    }
}
