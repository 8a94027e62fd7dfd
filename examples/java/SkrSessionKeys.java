// Java 17 SunPKCS11 as the JCE provider for AES/GCM with session keys on skr-pkcs11: a key
// imported from a SecretKeySpec (SunPKCS11 creates it with C_CreateObject as a session object)
// and a key generated on the token (C_GenerateKey); the token's AES/GCM output is checked with
// SunJCE, and SunJCE's ciphertext is opened on the token. Also the released key data-aes
// encrypts (its value never leaves the token).
//
// Usage: java SkrSessionKeys PKCS11_CFG

import java.security.*;
import java.util.*;
import javax.crypto.*;
import javax.crypto.spec.*;

public class SkrSessionKeys {
    static void check(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
        System.out.println("ok " + what);
    }

    static byte[] gcm(Provider p, int mode, Key k, byte[] iv, byte[] data) throws Exception {
        Cipher c = p == null ? Cipher.getInstance("AES/GCM/NoPadding")
                             : Cipher.getInstance("AES/GCM/NoPadding", p);
        c.init(mode, k, new GCMParameterSpec(128, iv));
        c.updateAAD("header".getBytes());
        return c.doFinal(data);
    }

    public static void main(String[] args) throws Exception {
        Provider p = Security.getProvider("SunPKCS11").configure(args[0]);
        Security.addProvider(p);
        KeyStore ks = KeyStore.getInstance("PKCS11", p);
        ks.load(null, null); // C_Login (protected authentication path)
        SecureRandom rnd = new SecureRandom();
        byte[] raw = new byte[32], iv = new byte[12];
        rnd.nextBytes(raw);
        rnd.nextBytes(iv);
        byte[] msg = "JCE AES/GCM on a session key".getBytes();
        SecretKeySpec spec = new SecretKeySpec(raw, "AES");

        // 1. An imported key: SunPKCS11 turns the SecretKeySpec into a session object.
        Key imported = SecretKeyFactory.getInstance("AES", p).translateKey(spec);
        check(imported.getClass().getName().startsWith("sun.security.pkcs11"), "SecretKeySpec imported as a token session key");
        byte[] ct = gcm(p, Cipher.ENCRYPT_MODE, imported, iv, msg);
        check(Arrays.equals(ct, gcm(null, Cipher.ENCRYPT_MODE, spec, iv, msg)), "token AES/GCM equals SunJCE AES/GCM");
        byte[] sunCt = gcm(null, Cipher.ENCRYPT_MODE, spec, iv, "from SunJCE".getBytes());
        check(new String(gcm(p, Cipher.DECRYPT_MODE, imported, iv, sunCt)).equals("from SunJCE"), "token opens SunJCE's AES/GCM");
        byte[] bad = sunCt.clone();
        bad[0] ^= 1;
        try {
            gcm(p, Cipher.DECRYPT_MODE, imported, iv, bad);
            check(false, "tampered ciphertext refused");
        } catch (AEADBadTagException e) {
            check(true, "tampered ciphertext refused (AEADBadTagException)");
        }

        // 2. A key generated on the token (C_GenerateKey, session object): round trip.
        KeyGenerator kg = KeyGenerator.getInstance("AES", p);
        kg.init(256);
        SecretKey generated = kg.generateKey();
        byte[] gct = gcm(p, Cipher.ENCRYPT_MODE, generated, iv, msg);
        check(Arrays.equals(gcm(p, Cipher.DECRYPT_MODE, generated, iv, gct), msg), "generated session key round-trips AES/GCM");
        check(generated.getEncoded() == null, "generated key is sensitive (getEncoded() == null)");

        // 3. The released key encrypts on the token and stays there.
        Key released = ks.getKey("data-aes", null);
        check(released != null && released.getEncoded() == null, "released data-aes found, value not exported");
        byte[] rct = gcm(p, Cipher.ENCRYPT_MODE, released, iv, msg);
        check(Arrays.equals(gcm(p, Cipher.DECRYPT_MODE, released, iv, rct), msg), "released data-aes round-trips AES/GCM");
        System.out.println("java session keys: all checks passed");
    }
}
