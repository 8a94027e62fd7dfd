// Java 17 SunPKCS11 as the JCE provider for AES/GCM with a key unwrapped on skr-pkcs11: a data
// key is wrapped outside the TEE (SunJCE, RSA/ECB/PKCS1Padding to tls-rsa's certificate),
// unwrapped ON the token with the released tls-rsa (C_UnwrapKey) into a sensitive session key,
// which opens what SunJCE sealed with the data key and seals exactly as SunJCE does. The data
// key's value never exists in this JVM after the wrap (see pkcs11-unwrap.cfg for why).
//
// Usage: java SkrUnwrap PKCS11_UNWRAP_CFG

import java.security.*;
import java.security.cert.Certificate;
import java.util.*;
import javax.crypto.*;
import javax.crypto.spec.*;

public class SkrUnwrap {
    static void check(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
        System.out.println("ok " + what);
    }

    static byte[] gcm(Provider p, int mode, Key k, byte[] iv, byte[] data) throws Exception {
        Cipher c = p == null ? Cipher.getInstance("AES/GCM/NoPadding")
                             : Cipher.getInstance("AES/GCM/NoPadding", p);
        c.init(mode, k, new GCMParameterSpec(128, iv));
        return c.doFinal(data);
    }

    public static void main(String[] args) throws Exception {
        Provider p = Security.getProvider("SunPKCS11").configure(args[0]);
        Security.addProvider(p);
        KeyStore ks = KeyStore.getInstance("PKCS11", p);
        ks.load(null, null); // C_Login (protected authentication path)

        // Outside the TEE: a fresh data key seals a file and is wrapped to tls-rsa's certificate.
        SecureRandom rnd = new SecureRandom();
        byte[] raw = new byte[32], iv = new byte[12];
        rnd.nextBytes(raw);
        rnd.nextBytes(iv);
        SecretKeySpec dataKey = new SecretKeySpec(raw, "AES");
        byte[] file = "an enveloped file for the TEE".getBytes();
        byte[] sealed = gcm(null, Cipher.ENCRYPT_MODE, dataKey, iv, file);
        Certificate cert = ks.getCertificate("tls-rsa");
        Cipher wrap = Cipher.getInstance("RSA/ECB/PKCS1Padding", "SunJCE");
        wrap.init(Cipher.WRAP_MODE, cert.getPublicKey());
        byte[] wrapped = wrap.wrap(dataKey);

        // Inside: unwrap on the token with the released private key.
        PrivateKey tlsRsa = (PrivateKey) ks.getKey("tls-rsa", null);
        Cipher unwrap = Cipher.getInstance("RSA/ECB/PKCS1Padding", p);
        unwrap.init(Cipher.UNWRAP_MODE, tlsRsa);
        Key onToken = unwrap.unwrap(wrapped, "AES", Cipher.SECRET_KEY);
        check(onToken.getClass().getName().startsWith("sun.security.pkcs11"),
              "data key unwrapped on the token (a PKCS#11 key object, not a Java key): " + onToken.getClass().getName());
        check(onToken.getEncoded() == null, "unwrapped key is sensitive (getEncoded() == null)");
        check(Arrays.equals(gcm(p, Cipher.DECRYPT_MODE, onToken, iv, sealed), file),
              "unwrapped key opens SunJCE's AES/GCM");
        byte[] iv2 = new byte[12];
        rnd.nextBytes(iv2);
        byte[] mine = gcm(p, Cipher.ENCRYPT_MODE, onToken, iv2, file);
        check(Arrays.equals(mine, gcm(null, Cipher.ENCRYPT_MODE, dataKey, iv2, file)),
              "unwrapped key seals exactly as SunJCE with the data key");
        System.out.println("java unwrap: all checks passed");
    }
}
