//! Object functions: attributes, find, and the refusals of a read-only, release-backed token.

use super::{bad, input, instance, out, p11_fn};
use crate::error::{Error, Result};
use crate::token::attr::{self, Entry};
use crate::token::session::Find;
use cryptoki_sys::*;

/// Largest attribute value accepted in a find template.
const MAX_TEMPLATE_VALUE: CK_ULONG = 64 * 1024;

fn write_protected() -> Error {
    Error::new(
        CKR_TOKEN_WRITE_PROTECTED,
        "the token is read-only: its objects come from configuration and the key release",
    )
}

/// Copy a caller's template (type, value) pairs.
///
/// # Safety
/// `p` is NULL or points to `count` CK_ATTRIBUTEs whose pValue are valid for ulValueLen.
unsafe fn read_template(
    p: *const CK_ATTRIBUTE,
    count: CK_ULONG,
) -> Result<Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>> {
    if count == 0 {
        return Ok(vec![]);
    }
    if p.is_null() || count > 4096 {
        return Err(bad("pTemplate is NULL or has an impossible count"));
    }
    let mut v = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        // SAFETY: the caller's array holds `count` entries.
        let a = unsafe { p.add(i).read_unaligned() };
        if a.ulValueLen > MAX_TEMPLATE_VALUE {
            return Err(Error::new(
                CKR_ATTRIBUTE_VALUE_INVALID,
                format!("attribute {:#x} value too long", a.type_),
            ));
        }
        // SAFETY: pValue is valid for ulValueLen bytes per the API.
        let val = unsafe { input(a.pValue as *const u8, a.ulValueLen, "template value")? };
        v.push((a.type_, val.to_vec()));
    }
    Ok(v)
}

p11_fn! {
    fn C_CreateObject(h: CK_SESSION_HANDLE, _t: *mut CK_ATTRIBUTE, _n: CK_ULONG, _ph: *mut CK_OBJECT_HANDLE) [h] {
        instance()?.module.session(h)?;
        Err(write_protected())
    }

    fn C_CopyObject(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, _t: *mut CK_ATTRIBUTE, _n: CK_ULONG, _ph: *mut CK_OBJECT_HANDLE) [h, obj] {
        let inst = instance()?;
        let (_, t) = inst.module.session_token(h)?;
        t.object(obj)?;
        // Every object has CKA_COPYABLE = FALSE.
        Err(Error::new(CKR_ACTION_PROHIBITED, "objects of this token cannot be copied"))
    }

    fn C_DestroyObject(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE) [h, obj] {
        let inst = instance()?;
        let (_, t) = inst.module.session_token(h)?;
        t.object(obj)?;
        Err(write_protected())
    }

    fn C_GetObjectSize(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, pul_size: *mut CK_ULONG) [h, obj] {
        let inst = instance()?;
        let (_, t) = inst.module.session_token(h)?;
        t.object(obj)?;
        // SAFETY: API out-pointer.
        unsafe { out(pul_size, CK_UNAVAILABLE_INFORMATION, "pulSize") }
    }

    fn C_GetAttributeValue(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG) [h, obj, count] {
        let inst = instance()?;
        let (_, t) = inst.module.session_token(h)?;
        let o = t.object(obj)?;
        if count == 0 {
            return Ok(());
        }
        if p_template.is_null() || count > 4096 {
            return Err(bad("pTemplate is NULL or has an impossible count"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        // Every entry is answered, whatever happens to the others (§3.1 rule 1).
        for i in 0..count as usize {
            // SAFETY: the caller's template holds `count` entries.
            let slot = unsafe { p_template.add(i) };
            let a = unsafe { slot.read_unaligned() };
            let buffer = (!a.pValue.is_null()).then_some(a.ulValueLen as usize);
            let e = attr::answer(o.attribute(a.type_), buffer);
            let len = match &e {
                Entry::Length(n) => *n as CK_ULONG,
                Entry::Copy(v) => {
                    // SAFETY: pValue holds ulValueLen ≥ v.len() bytes (checked by `answer`).
                    unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), a.pValue as *mut u8, v.len()) };
                    v.len() as CK_ULONG
                }
                Entry::Unavailable(_) => CK_UNAVAILABLE_INFORMATION,
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

    fn C_SetAttributeValue(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, _t: *mut CK_ATTRIBUTE, _n: CK_ULONG) [h, obj] {
        let inst = instance()?;
        let (_, t) = inst.module.session_token(h)?;
        t.object(obj)?;
        Err(write_protected())
    }

    fn C_FindObjectsInit(h: CK_SESSION_HANDLE, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG) [h, count] {
        let inst = instance()?;
        let (s, t) = inst.module.session_token(h)?;
        // SAFETY: API template.
        let template = unsafe { read_template(p_template, count)? };
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
        let (s, _) = inst.module.session_token(h)?;
        if pul_count.is_null() || (ph_object.is_null() && max > 0) {
            return Err(bad("phObject or pulObjectCount is NULL"));
        }
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

    fn C_GenerateKey(h: CK_SESSION_HANDLE, _m: *mut CK_MECHANISM, _t: *mut CK_ATTRIBUTE, _n: CK_ULONG, _ph: *mut CK_OBJECT_HANDLE) [h] {
        instance()?.module.session(h)?;
        Err(write_protected())
    }

    fn C_GenerateKeyPair(h: CK_SESSION_HANDLE, _m: *mut CK_MECHANISM, _t1: *mut CK_ATTRIBUTE, _n1: CK_ULONG, _t2: *mut CK_ATTRIBUTE, _n2: CK_ULONG, _ph1: *mut CK_OBJECT_HANDLE, _ph2: *mut CK_OBJECT_HANDLE) [h] {
        instance()?.module.session(h)?;
        Err(write_protected())
    }

    fn C_WrapKey(h: CK_SESSION_HANDLE, _m: *mut CK_MECHANISM, _k: CK_OBJECT_HANDLE, _key: CK_OBJECT_HANDLE, _out: *mut CK_BYTE, _len: *mut CK_ULONG) [h] {
        instance()?.module.session(h)?;
        Err(Error::new(CKR_FUNCTION_NOT_SUPPORTED, "keys never leave the token"))
    }

    fn C_UnwrapKey(h: CK_SESSION_HANDLE, _m: *mut CK_MECHANISM, _k: CK_OBJECT_HANDLE, _w: *mut CK_BYTE, _wl: CK_ULONG, _t: *mut CK_ATTRIBUTE, _n: CK_ULONG, _ph: *mut CK_OBJECT_HANDLE) [h] {
        instance()?.module.session(h)?;
        Err(Error::new(CKR_FUNCTION_NOT_SUPPORTED, "the token is read-only"))
    }

    fn C_DeriveKey(h: CK_SESSION_HANDLE, _m: *mut CK_MECHANISM, _k: CK_OBJECT_HANDLE, _t: *mut CK_ATTRIBUTE, _n: CK_ULONG, _ph: *mut CK_OBJECT_HANDLE) [h] {
        instance()?.module.session(h)?;
        Err(Error::new(CKR_FUNCTION_NOT_SUPPORTED, "no derivation mechanisms"))
    }
}
